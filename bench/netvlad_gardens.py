#!/usr/bin/env python
"""The Gardens Point row of the real NetVLAD weights: the MATLAB Pitts30k release
(catalogue entry `netvlad-pitts30k`, 4096-d after whitening), imported with
`model.matlab.import_netvlad_mat` and evaluated by `bench/baseline_gardens.py`
under the same protocol as the ImageNet teacher (database day_left at orig,
queries day_right / night_right at each quality, both small-query policies).

Runs only where the file is present (`$VPR_HOME/weights/Pitts30K_struct.mat`,
brought by `vpr weights fetch netvlad-pitts30k` or `vpr weights import`) and its
sha256 is the catalogue's; otherwise it writes a JSON that says why it skipped,
and exits 0. It never downloads.

    .venv/bin/python bench/netvlad_gardens.py --home var/bench-gardens [--limit 50 --max-side 320]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import baseline_gardens  # noqa: E402
from vpr.model.catalogue import get_entry  # noqa: E402
from vpr.model.fetch import FetchError, present  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.settings import HomeSettings  # noqa: E402

ENTRY = "netvlad-pitts30k"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=REPO / "var" / "bench-gardens")
    p.add_argument("--weights-home", type=Path, help="where the .mat is (default: $VPR_HOME/weights)")
    p.add_argument("--name", default="netvlad-pitts30k")
    p.add_argument("--out-json", type=Path, default=REPO / "bench" / "out" / "netvlad_gardens.json")
    args, rest = p.parse_known_args(argv)
    weights_home = args.weights_home or HomeSettings().weights_dir
    entry = get_entry(ENTRY)
    try:
        found = present(entry, weights_home)
        reason = None if found else f"{weights_home / entry.file_name} is absent (vpr weights fetch {ENTRY})"
    except FetchError as e:
        found, reason = None, str(e)
    if found is None:
        atomic_write_json(args.out_json, {"bench": "netvlad_gardens", "skipped": reason})
        print(f"netvlad_gardens: skipped: {reason}")
        return 0

    from vpr.model.matlab import import_netvlad_mat
    from vpr.model.registry import Registry

    reg = Registry(HomeSettings(home=args.home).models_dir)
    ref = None
    for version in reversed(reg.versions(args.name)) if args.name in reg.names() else []:
        if reg.manifest(f"{args.name}@{version}")["details"].get("source_sha256") == found.sha256:
            ref = f"{args.name}@{version}"
            break
    if ref is None:
        net, details = import_netvlad_mat(found.path)
        ref = str(reg.register(args.name, net, role="teacher", details={**details, "catalogue_entry": ENTRY}))
    code = baseline_gardens.main(["--home", str(args.home), "--teacher", ref, "--out-json", str(args.out_json), *rest])
    if code == 0:
        out = json.loads(args.out_json.read_text())
        out["weights"] = {"entry": ENTRY, "sha256": found.sha256, "model": ref}
        atomic_write_json(args.out_json, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
