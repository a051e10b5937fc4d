"""`vpr model ...`: register, inspect, activate, verify and use models."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from vpr.cli.common import CLIError, OwnerDefaults, comma_list, home_from
from vpr.model.config import BACKBONES

# Heavy imports (torch) happen inside the command functions, so that
# `vpr --help` and the light commands of other modules start fast.

# The owners of `vpr model init`'s defaults (see OwnerDefaults).
ARCHITECTURE = OwnerDefaults("vpr.model.config:ModelConfig")
INIT = OwnerDefaults("vpr.model.teacher:init_teacher")


def registry_from(args: argparse.Namespace):
    from vpr.model.registry import Registry

    return Registry(home_from(args).models_dir)


def main_init(args: argparse.Namespace) -> int:
    from vpr.model.config import ModelConfig
    from vpr.model.extract import default_device
    from vpr.model.teacher import init_teacher

    ref = init_teacher(
        registry_from(args),
        args.name,
        ModelConfig.model_validate(ARCHITECTURE.given(args)),
        args.weights,
        Path(args.cluster_images),
        activate=not args.no_activate,
        device=default_device(),
        offline=home_from(args).forbid_downloads,
        **INIT.given(args),
    )
    print(ref)
    return 0


def main_import(args: argparse.Namespace) -> int:
    from vpr.model.weights import import_pytorch_netvlad

    net, details = import_pytorch_netvlad(Path(args.checkpoint))
    reg = registry_from(args)
    ref = reg.register(args.name, net, role="teacher", details=details)
    if not args.no_activate:
        reg.activate(ref)
    print(ref)
    return 0


def main_import_mat(args: argparse.Namespace) -> int:
    """A .mat file, or a catalogue entry (fetched unless downloads are off)."""
    from vpr.model.catalogue import CATALOGUE
    from vpr.model.fetch import fetch
    from vpr.model.matlab import import_netvlad_mat

    home = home_from(args)
    source, entry_name = Path(args.source), None
    if not source.is_file() and args.source in CATALOGUE:
        entry = CATALOGUE[args.source]
        if entry.file_format != "matlab-struct":
            raise CLIError(f"{entry.name} is a {entry.kind} ({entry.file_format}), not a MATLAB NetVLAD release")
        source = fetch(entry, home.weights_dir, offline=home.forbid_downloads).path
        entry_name = entry.name
    elif not source.is_file():
        names = ", ".join(n for n, e in CATALOGUE.items() if e.file_format == "matlab-struct")
        raise CLIError(f"{source}: no such file, nor a catalogue entry ({names})")
    net, details = import_netvlad_mat(source)
    if entry_name is None:  # a file brought by hand: name the release it is, when its hash says so
        entry_name = next((n for n, e in CATALOGUE.items() if e.sha256 == details["source_sha256"]), None)
    reg = registry_from(args)
    ref = reg.register(args.name, net, role="teacher", details={**details, "catalogue_entry": entry_name})
    if not args.no_activate:
        reg.activate(ref)
    print(ref)
    return 0


def summary(reg, name: str, version: int) -> dict:
    m = reg.manifest(f"{name}@{version}")
    active = reg.active(name)
    return {
        "ref": f"{name}@{version}",
        "role": m["role"],
        "backbone": m["config"]["backbone"]["name"],
        "dim": m["descriptor_dim"],
        "parent": m.get("parent"),
        "created": m["created"],
        "active": bool(active and active.version == version),
    }


def main_list(args: argparse.Namespace) -> int:
    reg = registry_from(args)
    rows = [summary(reg, n, v) for n in reg.names() for v in reg.versions(n)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {reg.root}")
    for r in rows:
        print(
            f"{'*' if r['active'] else ' '} {r['ref']:<28} {r['role']:<8} {r['backbone']:<9} "
            f"dim={r['dim']:<6} parent={r['parent'] or '-'}  {r['created']}"
        )
    return 0


def main_show(args: argparse.Namespace) -> int:
    m = registry_from(args).manifest(args.model)
    print(json.dumps(m, indent=2) if args.json else "\n".join(f"{k}: {json.dumps(v)}" for k, v in m.items()))
    return 0


def main_activate(args: argparse.Namespace) -> int:
    print(registry_from(args).activate(args.model))
    return 0


def main_verify(args: argparse.Namespace) -> int:
    from vpr.model.registry import RegistryError

    reg = registry_from(args)
    try:
        reg.verify(args.model)  # weights, config and every exported artifact
        reg.load(args.model)
    except RegistryError as e:
        raise CLIError(f"verification failed: {e}") from e
    print(f"{reg.resolve(args.model)}: ok")
    return 0


def main_export(args: argparse.Namespace) -> int:
    """An export recorded as an artifact of the model version (`model.export`)."""
    from vpr.model.export import export_model
    from vpr.model.preprocess import list_images

    checks = list_images(Path(args.check_images))[: args.check_count] if args.check_images else []
    calibration = Path(args.calibration) if args.calibration else None
    if calibration is not None and not calibration.is_dir():
        raise CLIError(f"{calibration}: --calibration must be a folder of database images")
    entry = export_model(
        registry_from(args),
        args.model,
        args.format,
        check_images=checks,
        calibration=calibration,
        calibration_count=args.calibration_count,
        seed=args.seed,
    )
    print(json.dumps({k: entry[k] for k in ("source", "kind", "file", "sha256", "bytes", "check")}, indent=2))
    return 0


def main_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from vpr.describe.describe import describe
    from vpr.model.extract import default_device
    from vpr.model.fileio import atomic_write_bytes

    loaded = registry_from(args).load(args.model, device=default_device())
    descs = describe(loaded, [Path(p) for p in args.images], batch_size=args.batch_size, progress="embed").desc
    out = Path(args.out)
    if out.suffix != ".npy":
        raise CLIError(f"{out}: --out must end in .npy")
    buf = io.BytesIO()
    np.save(buf, descs)
    atomic_write_bytes(out, buf.getvalue())
    print(f"{out}: {descs.shape[0]} x {descs.shape[1]} descriptors from {loaded.ref}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="register, inspect and activate models")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    q = msub.add_parser("init", help="build a teacher, initialise its clusters by k-means, register it")
    q.add_argument("--name", required=True)
    ARCHITECTURE.add(q, "--backbone", field="backbone.name", choices=BACKBONES, help="CNN of the local features")
    ARCHITECTURE.add(q, "--cut", field="backbone.cut", help="ResNet cut point")
    ARCHITECTURE.add(
        q,
        "--trainable",
        field="backbone.trainable",
        type=comma_list,
        help="comma-separated backbone blocks left trainable (default: last block)",
    )
    q.add_argument("--weights", required=True, help="FILE.safetensors (vgg16 features), 'imagenet' or 'none'")
    ARCHITECTURE.add(q, "--preprocess", field="preprocess.mode", help="input normalisation of the weights")
    ARCHITECTURE.add(q, "--max-side", field="preprocess.max_side", type=int, help="cap on the longer image side")
    ARCHITECTURE.add(
        q,
        "--policy",
        field="preprocess.small_policy",
        help="input size: database (queries resized to the size the index recorded), native or upsample",
    )
    q.add_argument("--cluster-images", required=True, help="folder of images for k-means")
    ARCHITECTURE.add(q, "--clusters", field="netvlad.clusters", type=int, help="NetVLAD clusters (K)")
    INIT.add(q, "--samples", type=int, help="local features sampled for k-means")
    INIT.add(q, "--seed", type=int, help="seeds k-means and the sampling")
    ARCHITECTURE.add(q, "--pca-dim", type=int, help="add PCA-whitening to this dimension")
    INIT.add(q, "--pca-images", type=Path, help="folder to fit PCA on (default: the cluster images)")
    q.add_argument("--no-activate", action="store_true")
    q.set_defaults(func=main_init)

    q = msub.add_parser("import-netvlad", help="import a pytorch-NetVLAD checkpoint (.pth.tar)")
    q.add_argument("checkpoint")
    q.add_argument("--name", required=True)
    q.add_argument("--no-activate", action="store_true")
    q.set_defaults(func=main_import)

    q = msub.add_parser(
        "import-netvlad-mat", help="import a MATLAB NetVLAD release (.mat struct export, or a catalogue entry)"
    )
    q.add_argument("source", metavar="FILE_OR_ENTRY", help="a .mat file, or netvlad-pitts30k / netvlad-tokyotm")
    q.add_argument("--name", required=True)
    q.add_argument("--no-activate", action="store_true")
    q.set_defaults(func=main_import_mat)

    q = msub.add_parser("list", help="list registered models")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=main_list)

    q = msub.add_parser("show", help="print a model's manifest")
    q.add_argument("model", help="NAME@VERSION or NAME (active)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=main_show)

    q = msub.add_parser("activate", help="make a version the active one of its name")
    q.add_argument("model")
    q.set_defaults(func=main_activate)

    q = msub.add_parser("verify", help="check weights hash and config (non-zero exit on mismatch)")
    q.add_argument("model")
    q.set_defaults(func=main_verify)

    q = msub.add_parser(
        "export",
        help="export a model version as ONNX (dynamic H and W, NetVLAD and PCA included) or its int8 quantization",
        description="The file is recorded in the version's manifest (artifacts.<format>: sha256, source) and runs "
        "under the onnx-fp32 / onnx-int8 / onnx-trt engines (VPR_ENGINE).",
    )
    q.add_argument("model", help="NAME or NAME@VERSION")
    q.add_argument("--format", choices=("onnx", "onnx-int8"), default="onnx")
    q.add_argument("--check-images", metavar="DIR", help="also check the export against PyTorch on these images")
    q.add_argument("--check-count", type=int, default=4, help="images of --check-images to check on (4)")
    q.add_argument("--calibration", metavar="DIR", help="onnx-int8: database images to calibrate the ranges on")
    q.add_argument("--calibration-count", type=int, default=64, help="onnx-int8: images drawn for calibration (64)")
    q.add_argument("--seed", type=int, default=0, help="onnx-int8: which images are drawn (0)")
    q.set_defaults(func=main_export)

    q = msub.add_parser("embed", help="describe images, save an (N, D) .npy")
    q.add_argument("model")
    q.add_argument("images", nargs="+")
    q.add_argument("--out", required=True)
    q.add_argument("--batch-size", type=int, default=8)
    q.set_defaults(func=main_embed)
