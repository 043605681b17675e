"""Model definitions."""

from loopus_jax.models.transformer import LayerStack, ModelOutput, Transformer

__all__ = ["LayerStack", "ModelOutput", "Transformer"]
