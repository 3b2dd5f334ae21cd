"""The halos anomaly reference: the oracle score (``anomaly.nuisance_oracle_aurocs``) against
its analytic AUROC, and a tiny end-to-end run of ``studies/halos_anomaly_reference.py``."""

from __future__ import annotations

import json
import math

from pyro_dlatent.anomaly import nuisance_oracle_aurocs
from pyro_dlatent.data import simulate, split
from tests.conftest import run_script


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC estimate (Hanley & McNeil 1982, eq. 2)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)
    return math.sqrt(var / (n_pos * n_neg))


def test_oracle_offsets_in_r500_units_match_the_analytic_auroc():
    # Offsets in units of R500 are N(0, s^2 I) for relaxed halos and N(0, 9 s^2 I) for disturbed
    # ones, so |offset|^2 is exponential with means 2 s^2 and 18 s^2 and the AUROC of any score
    # increasing in |offset| is P(9 E1 > E2) = 9 / 10 for independent unit exponentials. The
    # Mahalanobis radius of the pooled covariance is that score up to the sample covariance's
    # anisotropy; the estimate must sit within 4 of its standard errors of 0.9.
    ds = simulate("halos", 6000, size=16, seed=11)
    train, held = split(ds, 0.3, seed=11)
    result = nuisance_oracle_aurocs(train, held, seed=0)
    flag = held["disturbed"].values
    n_pos, n_neg = int(flag.sum()), int((~flag).sum())
    got = result["offsets (r500)"]["auroc"]
    assert abs(got - 0.9) < 4 * hanley_mcneil_se(0.9, n_pos, n_neg)
    # uninformative coordinates dilute the radius: with the ellipticity and two N(0, 1) columns
    # the same halos score lower (the gap, about 0.05, is several of its standard errors)
    assert result["offsets+ellipticity+2 noise (r500)"]["auroc"] < got
    for scores in result.values():
        assert 0.5 < scores["auroc"] <= 1.0 and 0.5 < scores["auroc_by_mass"] <= 1.0


def test_tiny_run_writes_every_result(tmp_path):
    out = tmp_path / "reference.json"
    argv = ["--num", "600", "--size", "16", "--epochs", "2", "--classifiers", "1"]
    run_script("studies/halos_anomaly_reference.py", *argv, "--threads", "1", "--output", str(out))
    result = json.loads(out.read_text())
    (run,) = result["classifier"]
    assert 0.0 <= run["auroc"] <= 1.0 and run["best_epoch"] in (0, 1)
    assert len(run["auroc_by_mass_quartile"]) == 4
    assert 0.0 <= result["classifier_ensemble_auroc"] <= 1.0
    assert len(result["oracle_mahalanobis"]) == 6
