"""Run the tap catalogue over the model zoo and write docs/zoo.md.

Every torchvision classification model and the smallest member of each major timm family, random weights, small
inputs, on the CPU. Per model: how many taps, the stage taps with their layout and `avg` dims, and whether the codes at
the stage taps equal the library's own feature extraction (torchvision's ``create_feature_extractor`` at the same
nodes; for timm also ``forward_intermediates`` at the ``feature_info`` stages). Models too large for this machine are
skipped and listed.

    python benchmarks/zoo_coverage.py                 # everything (about 20 minutes on 2 cores)
    python benchmarks/zoo_coverage.py resnet50 timm:convnext_atto   # some models, printed only
"""

from __future__ import annotations

import gc
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from cnncodes import CodeExtractor, list_taps, load_backbone

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

# Too large for a 2-core, 24 GiB machine in this budget (hundreds of millions of parameters at random init).
TOO_LARGE = {"vit_h_14": "632 M parameters", "regnet_y_128gf": "645 M parameters", "vit_l_16": "304 M parameters",
             "vit_l_32": "306 M parameters", "regnet_y_32gf": "145 M parameters, 4 min to initialise here"}  # fmt: skip

# The smallest member of each major timm family (by the family's own naming).
TIMM = [
    "resnet18", "resnet18d", "resnetv2_50", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s", "regnetx_002",
    "regnety_002", "regnetz_b16", "efficientnet_b0", "tf_efficientnet_lite0", "efficientnetv2_rw_t", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_050", "ghostnet_050", "rexnet_100", "hgnetv2_b0",
    "repvgg_a0", "repvit_m1", "densenet121", "dla34", "dpn48b", "cspresnet50", "cspdarknet53", "hrnet_w18_small",
    "inception_v3", "inception_next_tiny", "xception41", "vgg11", "convnext_atto", "convnextv2_atto", "edgenext_xx_small",
    "fastvit_t8", "efficientvit_b0", "efficientformer_l1", "efficientformerv2_s0", "mobilevit_xxs", "mobilevitv2_050",
    "poolformer_s12", "mambaout_femto", "starnet_s050", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224", "beitv2_base_patch16_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "pit_ti_224", "levit_128s", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224",
    "maxvit_rmlp_pico_rw_256", "coatnet_nano_rw_224", "davit_tiny", "focalnet_tiny_srf", "tiny_vit_5m_224",
    "twins_pcpvt_small", "pvt_v2_b0", "mixer_s16_224", "resmlp_12_224", "convit_tiny", "nfnet_l0", "tresnet_m",
]  # fmt: skip


class _Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Timeout


def _reference_avg(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.mean((2, 3))


def check_model(spec: str, sizes: tuple[int, ...]) -> dict:
    """Catalogue one model at the first input size it accepts and compare its stage codes with the library's."""
    errors = []
    for size in sizes:
        try:
            start = time.perf_counter()
            bb = load_backbone(spec, input_size=size)
            cat = list_taps(bb)
            break
        except Exception as exc:  # a model that wants another input size: try the next
            errors.append(f"{size}px: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    else:
        return {"spec": spec, "error": "; ".join(errors)}
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = [t.name for t in cat.stage_taps]
    checks = []
    with torch.inference_mode():
        ours = CodeExtractor(bb, names, "avg,none", relu="never", catalogue=cat)(x)
        if cat.mode == "fx":
            make = timm.models.create_feature_extractor if spec.startswith("timm:") else create_feature_extractor
            theirs = make(bb.model, return_nodes={n: n for n in names})(x)
            same = all(torch.allclose(ours[n]["none"], theirs[n].flatten(1), rtol=1e-4, atol=1e-4) for n in names)
            checks.append(f"nodes {'equal' if same else 'DIFFER'}")
        if cat.stage_source == "feature_info" and hasattr(bb.model, "forward_intermediates"):
            try:
                info = [str(e["module"]) for e in bb.model.feature_info]
                inter = bb.model.forward_intermediates(x, indices=len(info), output_fmt="NCHW", intermediates_only=True)
                by_module = dict(zip(info[len(info) - len(inter) :], inter))  # some models return no stem map
                pairs = [(t.name, by_module[m]) for t in cat.stage_taps for m in by_module
                         if t.name == m or t.name.startswith(m + ".")]  # fmt: skip
                same = bool(pairs) and all(
                    torch.allclose(ours[n]["avg"], _reference_avg(f), rtol=1e-4, atol=1e-4) for n, f in pairs
                )
                checks.append(f"feature_info stages {'equal' if same else 'DIFFER'} ({len(pairs)})")
            except Exception as exc:  # not every timm model implements forward_intermediates for all indices
                checks.append(f"forward_intermediates n/a ({type(exc).__name__})")
    stages = [f"`{t.name}` {t.layout.describe()} {t.code_dims('avg')}" for t in cat.stage_taps]
    return {"spec": spec, "size": size, "mode": cat.mode, "taps": len(cat), "source": cat.stage_source, "stages": stages,
            "check": ", ".join(checks) or "-", "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv: list[str]) -> None:
    if argv:
        specs = [s if s.endswith(":none") else f"{s}:none" for s in argv]
    else:
        tv = [f"{n}:none" for n in torchvision.models.list_models(module=torchvision.models) if n not in TOO_LARGE]
        specs = tv + [f"timm:{n}:none" for n in TIMM]
    signal.signal(signal.SIGALRM, _alarm)
    rows, started = [], time.perf_counter()
    for spec in specs:
        signal.alarm(240)
        try:
            row = check_model(spec, (64, 224, 256))
        except _Timeout:
            row = {"spec": spec, "error": "over 240 s"}
        finally:
            signal.alarm(0)
        rows.append(row)
        status = (
            row.get("error") or f"{row['taps']} taps, {len(row['stages'])} stages ({row['source']}), {row['check']}"
        )
        print(f"{spec:<45} {status}", flush=True)
        gc.collect()
    if argv:
        return
    write_doc(rows, time.perf_counter() - started)


def write_doc(rows: list[dict], seconds: float) -> None:
    ok = [r for r in rows if "error" not in r]
    differ = [r for r in ok if "DIFFER" in r["check"]]
    lines = [
        "# Model zoo coverage",
        "",
        f"Written by `python benchmarks/zoo_coverage.py` on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}; {seconds / 60:.1f} min.",
        "",
        f"{len(ok)} of {len(rows)} models catalogued; stage codes equal the library's own extractor for "
        f"{len(ok) - len(differ)} of {len(ok)}. Random weights, smallest accepted input of 64/224/256 px. "
        "`nodes equal`: our codes (`--pool none --relu never`) at every stage tap equal torchvision's/timm's "
        "`create_feature_extractor` at the same nodes; `feature_info stages equal`: our `avg` codes equal the spatial "
        "mean of timm's `forward_intermediates` at the model's declared stages.",
        "",
        "| model | px | mode | taps | stages from | stage taps (layout, avg dims) | codes vs library |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        lines.append(f"| {r['spec']} | {r['size']} | {r['mode']} | {r['taps']} | {r['source']} | "
                     f"{'<br>'.join(r['stages'])} | {r['check']} |")  # fmt: skip
    failed = [r for r in rows if "error" in r]
    lines += ["", "## Skipped", ""]
    lines += [f"- `{name}`: too large for this machine ({why})" for name, why in TOO_LARGE.items()]
    lines += [f"- `{r['spec']}`: {r['error']}" for r in failed]
    Path(__file__).resolve().parents[1].joinpath("docs", "zoo.md").write_text("\n".join(lines) + "\n")
    print(f"wrote docs/zoo.md: {len(ok)} models, {len(failed)} failed, {len(differ)} differ")


if __name__ == "__main__":
    main(sys.argv[1:])
