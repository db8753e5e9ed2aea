"""This box's calibration for `homelab-disagg plan`, from the experiments' CSVs
(homelab_disagg/calibration.py reads them).

    python3 -m experiments.calibrate [DIR] [--json OUT]   the calibration of DIR's CSVs, as JSON
    python3 -m experiments.calibrate --probe [--json OUT]  measure this box first (exp5 at three prompt
                                                          lengths, exp4 at batch 1 and 8), then the same

then `homelab-disagg plan --calibration OUT`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from experiments.common import RESULTS_DIR
from homelab_disagg.calibration import from_results
from homelab_disagg.plan import Calibration


def probe(model: Path | None = None, log=print) -> Calibration:
    """A few minutes of measurement on this box (both nodes here), then `from_results`."""
    from experiments import exp4_decode_scaling, exp5_ttft_anatomy
    from experiments.common import node_split

    split = node_split()
    threads = str(len(split.decode_cpus)) if split.decode_cpus else "0"
    out = Path(tempfile.mkdtemp(prefix="homelab-disagg-probe-"))
    common = ["--out", str(out)] + (["--model", str(model)] if model else [])
    log(f"probe: TTFT anatomy at 128, 512, 1024 tokens and decode at batch 1 and 8 -> {out}")
    exp5_ttft_anatomy.main(common + ["--prompts", "128,512,1024", "--repeats", "1"])
    exp4_decode_scaling.main(common + ["--batches", "1,8", "--repeats", "1", "--placements", "none"]
                             + (["--threads", threads] if threads != "0" else []))
    return from_results(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR)
    p.add_argument("--probe", action="store_true", help="measure this box first (a few minutes)")
    p.add_argument("--json", type=Path, default=None, help="also write the calibration here")
    args = p.parse_args(argv)
    cal = probe() if args.probe else from_results(args.results)
    text = json.dumps(cal.to_dict(), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
