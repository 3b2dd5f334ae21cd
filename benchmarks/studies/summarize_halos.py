"""One line per model of each ``dlcfm_halos.py`` results JSON: the numbers of its quality criteria.

Run::

    python benchmarks/studies/summarize_halos.py RESULTS.json [MORE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VIEWS_KEY = "anomaly_auroc_disturbed_by_mass_dihedral"

__all__ = ["main", "summary_lines"]


def summary_lines(result: dict) -> list[str]:
    """Alignment, Y-M slope, c-M relation, anomaly AUROC and fidelity of each model."""
    lines = [f"epochs {result['epochs_run']}, training seconds {result['train_seconds']}"]
    for name, m in result["models"].items():
        r = ", ".join(f"{k} {v:.3f}" for k, v in m["pearson_r"].items())
        slope = m["y_m_slope"]
        lines.append(
            f"  {name}: r ({r}), leakage {m['leakage']:.3f}, "
            f"Y-M slope {slope['generated']:.3f} vs {slope['simulator']:.3f}, "
            f"c-M worst bin {m['c_m_relation']['from_latents']['max_abs_dex']:.3f} dex "
            f"(scatter {m['c_m_relation']['from_latents']['scatter_dex']}), "
            f"AUROC {m.get('anomaly_auroc_disturbed', float('nan')):.3f} "
            f"(by mass, 8 views {m.get(VIEWS_KEY, float('nan')):.3f}), "
            f"power spectrum {m['power_spectrum_error']:.3f}, "
            f"histogram W1 {m['pixel_histogram_w1']:.4g}"
        )
    gain = result.get("fidelity_gain_over_auxvae")
    if gain:
        lines.append(
            "  fidelity gain over auxvae: " + ", ".join(f"{k} {v:.2f}" for k, v in gain.items())
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    for name in sys.argv[1:] if argv is None else argv:
        print(f"== {Path(name).stem}")
        print("\n".join(summary_lines(json.loads(Path(name).read_text()))))


if __name__ == "__main__":
    main()
