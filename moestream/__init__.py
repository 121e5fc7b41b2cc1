"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from SSD."""

__version__ = "0.1.0"

from .runtime import StreamedModel, load  # noqa: E402

__all__ = ["StreamedModel", "load", "__version__"]
