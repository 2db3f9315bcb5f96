"""The Hugging Face side of a bundle (workstation only, torch + transformers): a bundle plus deltas as a
``transformers`` model, so ``transformers.pipeline`` runs it."""

from edgepeft.hf.bundle_model import BundleModel, bundle_pipeline, bundle_tokenizer

__all__ = ["BundleModel", "bundle_pipeline", "bundle_tokenizer"]
