"""The report's plots, as plotly figures built from a run's views: the optimisation
history, the learning curves with ASHA's rungs, Optuna's parallel coordinates and
parameter importances, and the top trials' confusion matrices and per-class bars.
``search/results/html.py`` puts them on the page.

Optuna's plots read a study; the run's own study holds one Optuna trial per attempt
(a continued trial is a second one) and leaves ASHA-stopped trials without a value, so
the parameter plots read an in-memory study with one trial per run-level id, valued at
its best macro-F1.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search.results.trials import FAILED, RUNNING, STOPPED_EARLY, TrialView
from search.space.model import SearchSpace
from search.study import TIMESTAMP
from trainables.training.metrics import RANKING_METRIC

TRIALS_IN_LEGEND = 40  # learning curves: a trace and a legend entry per trial up to this many
# Parallel coordinates: the lines of the best this many trials. Optuna draws a trace per
# trial; at 1,000 they were 3-5 s of the report and one tangle of lines.
PARALLEL_TRIALS = 200
MIN_TRIALS_FOR_IMPORTANCE = 5  # fewer results say nothing about which parameter mattered
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}
_STATUS_STYLE = {  # line dash and colour of a learning curve, by how the trial ended
    STOPPED_EARLY: ("dot", None), FAILED: ("dash", "#999999"), RUNNING: ("longdash", None),
}


def optimisation_history(trials: list[TrialView]) -> go.Figure | None:
    """Best-so-far macro-F1 against finished trials and against epochs spent (ASHA's cost)."""
    epochs = sorted((e[TIMESTAMP], e[RANKING_METRIC]) for t in trials for e in t.epochs if TIMESTAMP in e)
    if not epochs:
        return None
    ended = sorted((t.epochs[-1][TIMESTAMP], t.best_epoch[RANKING_METRIC]) for t in trials
                   if t.epochs and t.status not in (RUNNING,) and TIMESTAMP in t.epochs[-1])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against finished trials", "against epochs spent"))
    if ended:
        fig.add_trace(go.Scatter(x=list(range(1, len(ended) + 1)), y=_running_max([v for _, v in ended]),
                                 mode="lines+markers", line_shape="hv", name="best so far (trials)"), row=1, col=1)
        fig.add_trace(go.Scatter(x=list(range(1, len(ended) + 1)), y=[v for _, v in ended], mode="markers",
                                 marker={"color": "#bbbbbb"}, name="trial's best"), row=1, col=1)
    fig.add_trace(go.Scatter(x=list(range(1, len(epochs) + 1)), y=_running_max([v for _, v in epochs]),
                             mode="lines", line_shape="hv", name="best so far (epochs)"), row=1, col=2)
    fig.update_xaxes(title_text="trials finished", row=1, col=1)
    fig.update_xaxes(title_text="epochs trained, all trials", row=1, col=2)
    fig.update_yaxes(title_text=RANKING_METRIC, row=1, col=1)
    fig.update_layout(title="Optimisation history", height=380, **_LAYOUT)
    return fig


def _running_max(values: list[float]) -> list[float]:
    best, out = float("-inf"), []
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def learning_curves(trials: list[TrialView], rungs: list[int]) -> go.Figure | None:
    """Validation macro-F1 per epoch of every trial; a stopped trial's last epoch is an X.

    Up to ``TRIALS_IN_LEGEND`` trials, each is a trace of its own (a click on its legend
    entry hides it); beyond, the trials of one status share a trace, their curves
    separated by gaps: 1,000 traces took plotly 1 s to build and named 1,000 legend rows."""
    shown = [t for t in trials if t.epochs]
    if not shown:
        return None
    fig = go.Figure()
    if len(shown) <= TRIALS_IN_LEGEND:
        groups = [(f"{t.trial_id} ({t.status})", t.status, [t]) for t in shown]
    else:
        by_status: dict[str, list[TrialView]] = {}
        for trial in shown:
            by_status.setdefault(trial.status, []).append(trial)
        groups = [(f"{status} ({len(group)} trials)", status, group) for status, group in by_status.items()]
    for name, status, group in groups:
        x, y, symbols, hover = [], [], [], []
        for trial in group:
            epochs = [e["epoch"] for e in trial.epochs]
            marks = ["circle"] * len(epochs)
            if trial.status == STOPPED_EARLY:
                marks[-1] = "x"
            gap = [None] if x else []  # plotly breaks a line at a missing point
            x += gap + epochs
            y += gap + [e[RANKING_METRIC] for e in trial.epochs]
            symbols += ["circle"] * len(gap) + marks
            hover += [""] * len(gap) + [f"{trial.trial_id} {trial.config.model.backbone}"] * len(epochs)
        dash, colour = _STATUS_STYLE.get(status, ("solid", None))
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=name, text=hover, connectgaps=False,
            line={"dash": dash, "color": colour}, marker={"symbol": symbols, "size": 7},
            hovertemplate="%{text}<br>epoch %{x}: %{y:.4f}<extra></extra>",
        ))
    for milestone in rungs:
        fig.add_vline(x=milestone, line={"dash": "dot", "color": "#888888"}, annotation_text=f"ASHA rung {milestone}")
    fig.update_layout(title="Learning curves (X: stopped by ASHA; dotted: stopped, dashed: failed)",
                      xaxis_title="epoch", yaxis_title=f"validation {RANKING_METRIC}", height=420, **_LAYOUT)
    fig.update_xaxes(dtick=1)
    return fig


class _UncopiedTrials(optuna.storages.InMemoryStorage):
    """An in-memory study whose readers get its trials themselves, not deep copies.

    Optuna's plots read ``study.trials``, a deep copy of every trial, once per parameter
    and more: at 1,000 trials the copies were 2.8 s of an 8 s report. The report's study
    is built for them, and they only read it."""

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        return super().get_all_trials(study_id, deepcopy=False, states=states)


def parameter_study(trials: list[TrialView], space: SearchSpace) -> optuna.Study:
    """One finished in-memory trial per run-level trial with a result, valued at its best
    macro-F1: the study Optuna's parameter plots read."""
    study = _empty_study()
    for trial in trials:
        best = trial.best_epoch
        distributions = space.distributions_of(trial.params) if best else None
        if distributions is None:
            continue
        params = {k: v for k, v in trial.params.items() if k in distributions}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params}, value=best[RANKING_METRIC],
            user_attrs={"trial_id": trial.trial_id},
        ))
    return study


def _empty_study() -> optuna.Study:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        return optuna.create_study(storage=_UncopiedTrials(), direction="maximize", study_name="report")
    finally:
        optuna.logging.set_verbosity(verbosity)


def parallel_coordinates(study: optuna.Study, limit: int = PARALLEL_TRIALS) -> go.Figure | None:
    """Optuna's parallel coordinates of the study's best ``limit`` trials."""
    trials = study.get_trials(deepcopy=False)
    if len(trials) < 2:
        return None
    title = f"Parallel coordinates (colour: best {RANKING_METRIC})"
    if len(trials) > limit:
        study = _empty_study()
        study.add_trials(sorted(trials, key=lambda t: t.value, reverse=True)[:limit])
        title = f"Parallel coordinates of the best {limit} of {len(trials)} trials (colour: best {RANKING_METRIC})"
    fig = optuna.visualization.plot_parallel_coordinate(study, target_name=RANKING_METRIC)
    fig.update_layout(title=title, height=440, **_LAYOUT)
    return fig


def importances(study: optuna.Study) -> tuple[go.Figure | None, str]:
    """Optuna's PED-ANOVA importances of the parameters every trial has, or why not."""
    n = len(study.trials)
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} trials with a result; "
                      f"this run has {n}.")
    try:
        with warnings.catch_warnings():
            # "Some regimes ... have less than 2 trials": a backbone's own unfreeze depth
            # in a small search. The note below says what the numbers rest on instead.
            warnings.simplefilter("ignore", UserWarning)
            fig = optuna.visualization.plot_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target_name=RANKING_METRIC)
    except (ValueError, RuntimeError) as err:  # e.g. no parameter common to every trial varies
        return None, f"Parameter importances could not be computed: {err}"
    fig.update_layout(title=f"Parameter importances (PED-ANOVA over {n} trials, on their best {RANKING_METRIC})",
                      height=360, **_LAYOUT)
    return fig, ("Importance of each parameter that every trial has (a loss's own parameters are not), "
                 "for reaching the top of the trials' best macro-F1. A trial ASHA stopped counts with the "
                 "value it had reached; a value seen in fewer than two trials weighs little.")


def confusion_matrix(details: dict[str, Any], title: str) -> go.Figure:
    names = list(details.get("per_class", {}))
    z = details.get("confusion_matrix", [])
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, colorscale="Blues", text=z, texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", height=420, **_LAYOUT)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def per_class_bars(details: dict[str, Any], title: str) -> go.Figure:
    per_class = details.get("per_class", {})
    labels = [f"{name} (n={m['support']})" for name, m in per_class.items()]
    fig = go.Figure([go.Bar(name=key, x=labels, y=[m[key] for m in per_class.values()])
                     for key in ("precision", "recall", "f1")])
    fig.update_layout(title=title, barmode="group", yaxis_range=[0, 1], xaxis_title="class (validation support)",
                      height=380, **_LAYOUT)
    return fig
