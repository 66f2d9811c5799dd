"""tools/: scripts that are not stages."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_real_scores_every_predictor_on_the_same_readings_beside_a_single_station_ridge(built, capsys):
    root, _ = built
    compare_real = load_tool("compare_real")
    row = compare_real.compare(root)
    predictions = pd.read_csv(root / "reports/predictions.csv")
    first = predictions[(predictions["step"] == 1) & predictions["observed"].notna()]
    assert 0 < row["readings"] <= len(first) and row["stations"] == first["station"].nunique() - 1  # one held out
    for name in compare_real.PREDICTORS:
        assert np.isfinite(row[name]) and row[name] > 0
    # A per-station autoregression beats tomorrow = today on a seasonal series with persistent weather.
    assert row["station_ridge"] < row["persistence"]
    assert compare_real.main([str(root)]) == 0
    assert f"{row['model']:.3f}" in capsys.readouterr().out
