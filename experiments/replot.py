"""Draw every experiment's PNG again from its CSV (e.g. results from a box without matplotlib).

    python3 -m experiments.replot DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments import common, exp1_architectures, exp2_transfer, exp3_codecs, exp4_decode_scaling, exp5_ttft_anatomy

PLOTS = {"exp1_architectures.csv": exp1_architectures.plot, "exp2_transfer.csv": exp2_transfer.plot,
         "exp3_codecs.csv": exp3_codecs.plot, "exp4_decode_scaling.csv": exp4_decode_scaling.plot,
         "exp5_ttft_anatomy.csv": exp5_ttft_anatomy.plot}


def replot(out_dir: Path) -> list[Path]:
    done = []
    for name, plot in PLOTS.items():
        path = out_dir / name
        if path.exists():
            rows = common.read_csv(path)
            meta = rows[0] if rows else {}
            title = (f"{meta.get('meta_model', '')}, {meta.get('meta_node_split', '')}, prefill on "
                     f"{meta.get('meta_prefill_device', '?')} ({meta.get('meta_host', '')}, {meta.get('meta_git_rev', '')})")
            done.append(plot(rows, out_dir, title))
    return done


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else common.RESULTS_DIR
    for png in replot(out_dir):
        print(png)


if __name__ == "__main__":
    main()
