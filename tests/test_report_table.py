"""The console table: every cell whole, numbers in one format per column."""

import math

from search.results.table import _CONSOLE_COLUMNS, format_table


def _row(**values):
    row = {name: None for name, _ in _CONSOLE_COLUMNS}
    row.update(rank=1, trial_id="t0000", status="completed", backbone="resnet10t", unfreeze_depth="all",
               loss="ce", lr_head=3e-3, lr_base=1e-3, macro_f1=0.9, val_loss=0.3, epochs_run=3, wall_time_s=52.2,
               reason=None)
    row.update(values)
    return row


def test_long_labels_are_never_cut_and_columns_stay_aligned():
    long_backbone = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    long_loss = "label_smoothing(smoothing=0.0666)"
    rows = [_row(), _row(rank=2, trial_id="t0001", backbone=long_backbone, loss=long_loss, wall_time_s=7.39,
                         macro_f1=math.nan, status="failed", reason="TrialConfigError: x (not retried)")]
    lines = format_table(rows).splitlines()
    assert long_backbone in lines[2] and long_loss in lines[2]
    header, first, second = lines[0], lines[1], lines[2]
    # Columns line up: each column starts at the same offset in every line.
    assert header.index("loss") == first.index("ce") == second.index(long_loss)
    assert " 52.2 " in f" {first} " and " 7.4" in second  # time_s: one decimal whatever its size
    assert lines[3].strip() == "reason: TrialConfigError: x (not retried)"
