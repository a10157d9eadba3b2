"""The attention explorer in Jupyter: :func:`explore` shows the report's explorer as an anywidget
widget (the same ``explorer.js``), static HTML where widgets cannot render; the query can be set
from Python and the displayed rows read back as arrays. The data and the page are
:mod:`unip_analysis.explorer`'s."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .explorer import (
    DEFAULT_EXPLORE_IMAGES,
    ExplorerData,
    column,
    payload,
    plan_images,
    qk_points,
    render_page,
    row,
    static_text,
)

# --- Jupyter -----------------------------------------------------------------------------------

_WIDGET_ESM = """
export default {
  render({ model, el }) {
    const root = document.createElement("div");
    root.className = "unip-explorer";
    root.tabIndex = 0;
    el.appendChild(root);
    let fromPython = false;
    const api = unipExplorerMount(root, { meta: model.get("meta"), blobs: model.get("blobs") }, {
      global: true,
      initial: Object.assign({}, model.get("state")),  // what Python set before the view opened
      onChange(state, displayed) {
        if (fromPython) return;
        model.set("state", { image: state.image, layer: state.layer, head: state.head, query: state.query });
        model.set("displayed", displayed);
        model.save_changes();
      },
    });
    const apply = () => {
      fromPython = true;
      try { api.set(Object.assign({}, model.get("state"))); } finally { fromPython = false; }
      model.set("displayed", api.displayed());
      model.save_changes();
    };
    api.ready.then(() => { apply(); model.on("change:state", apply); });
  },
};
"""


def _analyses_from(
    source, images, names, explore_images: int, img_size, norm: str, device: str, budget: int,
    qk_embedding: str = "pca",
) -> list:  # fmt: skip
    """Finished analyses as they are; loaded backbones analysed here, each at its own input size
    (its own grid) on the same first images, as many for every model (:func:`plan_images`)."""
    from .analyze import ModelAnalysis, analyze_backbone, explorer_shape, image_dataset
    from .checkpoints import LoadedBackbone

    if isinstance(source, (ModelAnalysis, LoadedBackbone)):
        source = [source]
    items = list(source.items()) if isinstance(source, Mapping) else [(None, s) for s in source]
    for _, item in items:
        if isinstance(item, ModelAnalysis):
            if item.explorer is None:
                raise ValueError(
                    f"analysis {item.name!r} has no explorer data; run analyze_backbone(..., explore_images=N) "
                    "or pass the backbone and images"
                )
        elif not isinstance(item, LoadedBackbone):
            raise TypeError(
                f"explore() takes ModelAnalysis or LoadedBackbone objects, got {type(item).__name__}"
            )
    backbones = [item for _, item in items if isinstance(item, LoadedBackbone)]
    if backbones and images is None:
        raise ValueError("explore(backbone, images): pass an image folder or a dataset to look at")
    n = plan_images([explorer_shape(bb) for bb in backbones], explore_images, budget)[0] if backbones else 0
    datasets: dict[int, torch.utils.data.Dataset] = {}  # one per input size, the same images
    out = []
    for j, (name, item) in enumerate(items):
        if isinstance(item, ModelAnalysis):
            out.append(item)
            continue
        size = img_size or item.img_size
        label = name or (names[j] if names else f"model{j + 1}")
        if isinstance(images, torch.utils.data.Dataset):
            dataset = images
            shape = tuple(dataset[0].shape[-2:])
            want = tuple(
                int(g * p)
                for g, p in zip(item.model.patch_embed.grid_size, item.model.patch_embed.patch_size)
            )
            if shape != want:
                raise ValueError(
                    f"explore(): the dataset's images are {shape[0]}x{shape[1]} px, the model "
                    f"{label!r} takes {want[0]}x{want[1]}; pass an image folder "
                    "(each model then gets the images at its own size) or a dataset at that size"
                )
        else:
            if size not in datasets:
                datasets[size] = image_dataset(images, size, norm, limit=n)
            dataset = datasets[size]
        sub = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
        for attr in ("files", "mean", "std"):  # what the analysis reads from the dataset
            if hasattr(dataset, attr):
                setattr(sub, attr, getattr(dataset, attr))
        out.append(
            analyze_backbone(
                item,
                sub,
                name=label,
                device=device,
                map_images=0,
                progress=False,
                explore_images=n,
                explore_budget=budget,
                qk_embedding=qk_embedding,
            )
        )
    return out


class Explorer:
    """The explorer of some analyses, for Python: the rows it displays, as numpy arrays, and its HTML.

    ``state`` is the query shown: image, layer (1-based), head (0-based or "mean") and query (patch
    index, row-major, of the first model). :meth:`displayed_rows` gives what the explorer shows for
    it, per model (the same computation as the browser's, see :func:`row`)."""

    def __init__(self, analyses: Sequence, thresholds=None, budget: int | None = None):
        from .patterns import default_thresholds

        self.analyses = {a.name: a for a in analyses}
        th = thresholds or default_thresholds(analyses[0].grid)
        self.meta, self.blobs = payload(analyses, th, {a.name: None for a in analyses}, budget)
        first = analyses[0]
        g = first.grid
        self.state = {"image": 0, "layer": 1, "head": "mean", "query": (g[0] // 2) * g[1] + g[1] // 2}

    def set(self, **change) -> None:
        """``set(query=5)``, ``set(query=(row, col))``, ``set(layer=3, head=1)``, ``set(key=(row, col))``
        (the key patch of "who looks here")..."""
        for name in ("query", "key"):
            p = change.get(name)
            if isinstance(p, tuple):
                change[name] = p[0] * next(iter(self.analyses.values())).grid[1] + p[1]
        self.state = {**self.state, **change}

    def row(self, model: str, image: int, layer: int, head: int | str, query: int) -> np.ndarray | None:
        return row(self.analyses[model].explorer, image, layer, head, query)

    def column(self, model: str, image: int, layer: int, head: int | str, key: int) -> np.ndarray:
        """ "Who looks here": the attention each stored query patch gives to patch ``key``."""
        return column(self.analyses[model].explorer, image, layer, head, key)

    def qk(self, model: str, layer: int, head: int) -> dict[str, np.ndarray]:
        """The query-key view's 2-D points (``queries``, ``keys``: images x tokens in order)."""
        return qk_points(self.analyses[model].explorer, layer, head)

    def displayed_rows(self) -> dict[str, np.ndarray]:
        """Per model, the row the explorer shows for the current state (query mapped by position)."""
        first = next(iter(self.analyses.values()))
        fr, fc = divmod(int(self.state["query"]), first.grid[1])
        out = {}
        for name, a in self.analyses.items():
            rows_, cols = a.grid
            r = min(int((fr + 0.5) / first.grid[0] * rows_), rows_ - 1)
            c = min(int((fc + 0.5) / first.grid[1] * cols), cols - 1)
            layer = min(int(self.state["layer"]), a.depth)
            head = self.state["head"]
            head = head if head == "mean" else min(int(head), a.heads_per_layer[layer - 1] - 1)
            image = min(int(self.state["image"]), len(a.explorer.images) - 1)
            out[name] = row(a.explorer, image, layer, head, _snap(a.explorer, r, c))
        return out

    def html(self) -> str:
        """A standalone page with the explorer (what the static fallback shows)."""
        return render_page(self.meta, self.blobs)

    def _repr_html_(self) -> str:
        import html as _html

        return (
            f'<iframe srcdoc="{_html.escape(self.html())}" style="width:100%;height:900px;border:0" '
            'title="attention explorer"></iframe>'
        )


def _snap(data: ExplorerData, r: int, c: int) -> int:
    s = data.query_stride
    rows_, cols = data.grid
    # halves round up, as the page's Math.round does
    r = min(math.floor(r / s + 0.5) * s, (rows_ - 1) // s * s)
    c = min(math.floor(c / s + 0.5) * s, (cols - 1) // s * s)
    return r * cols + c


def explore(
    source,
    images=None,
    *,
    names: Sequence[str] | None = None,
    explore_images: int = DEFAULT_EXPLORE_IMAGES,
    img_size: int | None = None,
    norm: str = "imagenet",
    device: str = "cpu",
    thresholds=None,
    widget: bool | None = None,
    explore_budget: float | None = None,
    qk_embedding: str = "pca",
):
    """The attention explorer in Jupyter: every layer x head for a query you choose, models side by side.

    ``source``: finished analyses (``analyze_backbone(..., explore_images=N)``) or loaded backbones
    (one, a list, or ``{name: backbone}``), which are analysed here on the first ``explore_images``
    of ``images`` (a folder or a dataset), each model at its own input size (``img_size`` for all),
    the same images for every model. ``explore_budget``: MB (default 60) that every model's data together may
    take (the encoding and query stride are chosen to fit, :func:`unip_analysis.explorer.choose_encodings`).
    ``qk_embedding``: the query-key view's 2-D embedding, pca (default), tsne or umap (the extra
    ``unip-toolkit[embed]``). Returns an anywidget widget where anywidget is installed
    (``widget=False``: the static HTML fallback, an :class:`Explorer`). Either way ``.set(query=...)``
    chooses the query from Python and ``.displayed_rows()`` returns the shown rows as numpy arrays.
    """
    from . import explorer

    budget = explorer.BUDGET_BYTES if explore_budget is None else int(explore_budget * 1e6)
    explorer.check_qk_embedding(qk_embedding)
    analyses = _analyses_from(
        source, images, names, explore_images, img_size, norm, device, budget, qk_embedding
    )
    base = Explorer(analyses, thresholds, budget)
    if widget is False:
        return base
    try:
        return _widget_class()(base)
    except ImportError:
        if widget:
            raise
        return base


def _widget_class():
    import anywidget
    import traitlets

    class ExplorerWidget(anywidget.AnyWidget):
        """The explorer as a Jupyter widget (JupyterLab, Notebook 7, VS Code): the report's JS module.

        ``state`` (image, layer, head, query) syncs both ways; ``displayed`` holds the rows the
        browser drew, once a front end has rendered the widget."""

        _esm = traitlets.Unicode(static_text("explorer.js") + _WIDGET_ESM).tag(sync=True)
        _css = traitlets.Unicode(static_text("explorer.css")).tag(sync=True)
        meta = traitlets.Dict().tag(sync=True)
        blobs = traitlets.Dict().tag(sync=True)
        state = traitlets.Dict().tag(sync=True)
        displayed = traitlets.Dict().tag(sync=True)

        def __init__(self, base: Explorer):
            super().__init__(meta=base.meta, blobs=base.blobs, state=dict(base.state))
            self.base = base

        def set(self, **change) -> None:
            self.base.set(**change)
            self.state = dict(self.base.state)

        def row(self, *args) -> np.ndarray | None:
            return self.base.row(*args)

        def column(self, *args) -> np.ndarray:
            return self.base.column(*args)

        def qk(self, *args) -> dict[str, np.ndarray]:
            return self.base.qk(*args)

        def displayed_rows(self) -> dict[str, np.ndarray]:
            self.base.state = dict(self.state)  # the front end may have moved it
            return self.base.displayed_rows()

        def html(self) -> str:
            return self.base.html()

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs)
            data = bundle[0] if isinstance(bundle, tuple) else bundle
            data["text/html"] = self.base._repr_html_()  # where widgets cannot render
            return bundle

    return ExplorerWidget
