"""``unip-compare``: many backbones fine-tuned and probed on many datasets with paired seeds, as one
command (the UNIP paper's comparison), and the same pieces for notebooks.

- :mod:`.plan`        the plan file (TOML / JSON): schema, checks, the cells it expands to
- :mod:`.backbones`   what a plan's backbone may be (checkpoint spec, run folder, random init)
- :mod:`.cells`       each cell's unip-finetune arguments, folder and state (finished / resume / new)
- :mod:`.execution`   running cells: child processes here or submitit jobs; progress and time left
- :mod:`.processes`   one cell attempt as a ``python -m unip_train.finetune`` process
- :mod:`.statistics`  results table, means with t intervals, paired t-tests against the baseline
- :mod:`.figures`     mIoU per backbone; layer-wise probing over NMI by depth
- :mod:`.report`      the self-contained report.html
- :mod:`.comparison`  the steps together: run_plan, build_outputs, write_outputs

Notebook use::

    from unip_train import compare
    plan = compare.load_plan("plan.toml")
    compare.run_plan(plan, "results/", jobs=2)
    out = compare.build_outputs(plan, "results/")
    out.summary                     # pandas; out.figures: {name: PNG bytes}; out.html
    compare.plot_layerwise(out.summary, out.results, "soda", "lp-layerwise", plan.selection_doc, {"unip_s": "unip_s"})
"""

from __future__ import annotations

import importlib

# Exported name -> submodule. Imported on first use, so that a submitit job, which imports only
# :mod:`.processes`, does not load torch, pandas and matplotlib before starting its cell.
_EXPORTS = {
    "Outputs": "comparison",
    "build_outputs": "comparison",
    "run_plan": "comparison",
    "write_outputs": "comparison",
    "plot_layerwise": "figures",
    "plot_miou": "figures",
    "render_figures": "figures",
    "Plan": "plan",
    "PlanError": "plan",
    "load_plan": "plan",
    "plan_from_dict": "plan",
    "paired_t": "statistics",
    "results_table": "statistics",
    "summarize": "statistics",
    "t_interval": "statistics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
