"""Attention-pattern analysis of Vision Transformers (UNIP, ICLR 2025).

The pieces, importable for notebooks:

- :mod:`unip_analysis.checkpoints`  load any family's checkpoint into a timm ViT / BEiT / EVA
- :mod:`unip_analysis.attention`    attention computed and observed a block of query rows at a time
- :mod:`unip_analysis.metrics`      NMI and mean attention distance on [B, H, Q, K] tensors
- :mod:`unip_analysis.patterns`     local / hybrid / global bands and the layer-selection rule
- :mod:`unip_analysis.analyze`      run a model over images and collect per-layer statistics
- :mod:`unip_analysis.selection`    the ``layer_selection.json`` contract (schema version 2; version 1 still read)
- :mod:`unip_analysis.plots`        figures
- :mod:`unip_analysis.explorer`     the interactive attention explorer (report.html); in Jupyter
  :mod:`unip_analysis.explorer_widget` (`explore`)
"""

__version__ = "0.1.0"


def explore(*args, **kwargs):
    """The interactive attention explorer in Jupyter: see :func:`unip_analysis.explorer_widget.explore`."""
    from .explorer_widget import explore as _explore

    return _explore(*args, **kwargs)
