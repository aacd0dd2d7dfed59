"""The planner's step-time model against published Stable Diffusion 2 training runs: ``python -m ldm_train.plan
--published [--json]``; and the weak scaling of a preset: ``python -m ldm_train.plan experiment=txt2img_1p45b
gpu=h100-80g --scaling``.

Each published run is expressed in our configs: the SD2 UNet (``conf/unet/sd2_base.yaml``, 865,910,724 parameters
as released), kl-f8 latents at the run's resolution, and for the frozen OpenCLIP ViT-H/14 text tower our text
encoder at its shape (width 1024, 16 heads of 64, the 23 layers up to the penultimate one SD2 reads, 77 tokens) as a
FLOP stand-in. Its FLOPs per sample (``ldm_train.flops.frozen_encoder_flops``) are the UNet's forward + backward,
plus the text encoder's forward and the VAE encode when the run computed them every step rather than precomputing
them. The step time is the planner's (``ldm_train.plan.micro_step_s`` + ``comm_s``): the runs' data parallelism as
the ZeRO traffic that matches it (DDP, NVIDIA's distributed Adam and MosaicML's FSDP SHARD_GRAD_OP with gradients
reduced once per optimizer step: the MosaicML table shows no per-micro-batch cost, 16 GPUs at accumulation 8 run as
fast per GPU as 8) in 16-bit. None of the runs is launch-bound (NVIDIA captures CUDA graphs; MosaicML's micro-batch
16 kernels outlast their launches), so ``launch_us`` is not fitted.

Two constants are fitted, each on one run: ``efficiency`` on MosaicML 8 x A100 at 256 px (one node, compute-bound:
the setting of our 1.45B preset), ``network_efficiency`` on NVIDIA's 512 x H100 MLPerf run (the largest share of
communication). Every other run is validation; the worst validation error is ``plan.VALIDATION_BAND``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from ldm_train.plan import (
    GPU,
    GPUS,
    VALIDATION_BAND,
    Assumptions,
    ModelProfile,
    comm_s,
    evaluate,
    micro_step_s,
)

MOSAIC = ("https://github.com/mosaicml/diffusion (README 'How many GPUs do I need?': U-Net throughput, VAE and CLIP "
          "latents precomputed; yamls/hydra-yamls/SD-2-base-256.yaml, -512.yaml: batch 2048, micro-batch 16, FSDP "
          "SHARD_GRAD_OP, amp_fp16)")
MLPERF4 = ("https://github.com/mlcommons/training_results_v4.0 NVIDIA/results/{system}/stable_diffusion/result_0.txt "
           "(training_step blocks; benchmarks/stable_diffusion/implementations/nemo/conf/custom.yaml: fp16, VAE "
           "moments and CLIP text encoded offline, DDP)")
MLPERF5 = ("https://github.com/mlcommons/training_results_v5.0 NVIDIA/results/nyx_n1_ngc25.04_nemo/stable_diffusion/"
           "result_0.txt (tracked_stats throughput 2194.6 images/s, train_step_time 0.1167 s; "
           "conf/sd2_mlperf_train_moments.yaml: VAE moments precomputed, captions encoded every step)")
EFFICIENCY_RUN = "mosaic-8xa100-256"
NETWORK_RUN = "mlperf4-512xh100-512"


@dataclass(frozen=True)
class PublishedRun:
    name: str
    gpu: str  # a plan.GPUS preset
    gpus: int
    gpus_per_node: int
    micro_batch: int  # per GPU
    global_batch: int
    resolution: int
    precision: str
    precomputed: tuple[str, ...]  # "latents" (VAE encode), "text" (text encoder forward)
    zero: int  # the ZeRO traffic that matches the run's data parallelism
    images_per_s_per_gpu: float  # measured
    source: str
    note: str = ""

    @property
    def role(self) -> str:
        return {EFFICIENCY_RUN: "fit: efficiency", NETWORK_RUN: "fit: network"}.get(self.name, "validation")


def _mosaic(gpus: int, resolution: int, images_per_s: float, note: str = "") -> PublishedRun:
    return PublishedRun(f"mosaic-{gpus}xa100-{resolution}", "a100-40g", gpus, 8, 16, 2048, resolution, "amp fp16",
                        ("latents", "text"), 1, images_per_s / gpus, MOSAIC, note or f"{images_per_s:g} images/s")


PUBLISHED: tuple[PublishedRun, ...] = (
    *(_mosaic(n, 256, ips) for n, ips in ((8, 1100), (16, 2180), (32, 4080), (64, 8530), (128, 11600))),
    *(_mosaic(n, 512, ips) for n, ips in ((8, 290), (16, 585), (32, 1195), (64, 2340), (128, 4590))),
    dataclasses.replace(
        _mosaic(8, 256, 1100 / 1.4, "1100 / 1.4: the README's 1.4x time when VAE and CLIP latents are computed "
                                    "while training"), name="mosaic-8xa100-256-encode", precomputed=()),
    PublishedRun("mlperf4-8xh200-512", "h200", 8, 8, 64, 512, 512, "fp16", ("latents", "text"), 1, 129.6,
                 MLPERF4.format(system="h200_ngc24.04_nemo"), "51,200 samples per 49.36 s (blocks 2-10)"),
    PublishedRun("mlperf4-64xh100-512", "h100-80g", 64, 8, 16, 1024, 512, "fp16", ("latents", "text"), 1, 110.5,
                 MLPERF4.format(system="eos_n8_ngc24.04_nemo"), "102,400 samples per 14.48 s"),
    PublishedRun(NETWORK_RUN, "h100-80g", 512, 8, 4, 2048, 512, "fp16", ("latents", "text"), 1, 73.5,
                 MLPERF4.format(system="eos_n64_ngc24.04_nemo"), "204,800 samples per 5.443 s"),
    PublishedRun("mlperf5-8xb200-512", "b200", 8, 8, 32, 256, 512, "fp16", ("latents",), 1, 274.3, MLPERF5,
                 "2194.6 images/s on 8 GPUs"),
)


@functools.cache
def sd2_flops(resolution: int) -> dict[str, float]:
    """Per-sample FLOPs of SD2's parts at ``resolution`` (counted on the meta device, once per process)."""
    from ldm_train.flops import frozen_encoder_flops
    from ldm_train.summary import compose_config

    return frozen_encoder_flops(compose_config([
        "experiment=txt2img_1p45b", "unet=sd2_base", f"data.resolution={resolution}", "text_encoder.n_embed=1024",
        "text_encoder.n_layer=23", "text_encoder.heads=16", "text_encoder.dim_head=64"]))


def run_profile(run: PublishedRun) -> ModelProfile:
    """The planner's view of a published run: the UNet trained, its frozen encoders' forwards where run per step."""
    f = sd2_flops(run.resolution)
    per_sample = (f["unet_train_flops"] + (0.0 if "text" in run.precomputed else f["text_encoder_forward_flops"])
                  + (0.0 if "latents" in run.precomputed else f["first_stage_encode_flops"]))
    no_ops = {False: (0.0, 0.0)}  # not launch-bound (module docstring)
    return ModelProfile(int(f["unet_params"]), per_sample, 0.0, {}, no_ops, 2)


def predict(run: PublishedRun, a: Assumptions) -> dict[str, Any]:
    gpu, prof = GPUS[run.gpu], run_profile(run)
    accumulation = run.global_batch // (run.micro_batch * run.gpus)
    step = accumulation * micro_step_s(prof, gpu, run.micro_batch, False, a) + comm_s(
        prof, gpu, run.gpus // run.gpus_per_node, run.gpus_per_node, run.zero, accumulation, a)
    predicted = run.micro_batch * accumulation / step
    return {"run": run.name, "role": run.role, "gpu": run.gpu, "gpus": run.gpus, "micro_batch": run.micro_batch,
            "global_batch": run.global_batch, "resolution": run.resolution, "precision": run.precision,
            "precomputed": "+".join(run.precomputed) or "none", "gflops_per_sample": round(prof.flops_per_sample / 1e9),
            "measured": round(run.images_per_s_per_gpu, 2), "predicted": round(predicted, 2),
            "error": round(predicted / run.images_per_s_per_gpu - 1, 4),
            "measured_mfu": round(run.images_per_s_per_gpu * prof.flops_per_sample / (gpu.peak_tflops * 1e12), 4),
            "note": run.note, "source": run.source}


def _solve(run: PublishedRun, a: Assumptions, key: str) -> float:
    """The value of ``a.<key>`` at which the prediction of ``run`` equals its measurement (bisection: the
    prediction grows with either efficiency)."""
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict(run, dataclasses.replace(a, **{key: mid}))["predicted"] < run.images_per_s_per_gpu:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fit(base: Assumptions | None = None) -> Assumptions:
    """``efficiency`` on EFFICIENCY_RUN and ``network_efficiency`` on NETWORK_RUN, alternated to the fixed point."""
    a = base or Assumptions()
    runs = {r.name: r for r in PUBLISHED}
    for _ in range(30):
        a = dataclasses.replace(a, efficiency=_solve(runs[EFFICIENCY_RUN], a, "efficiency"))
        a = dataclasses.replace(a, network_efficiency=_solve(runs[NETWORK_RUN], a, "network_efficiency"))
    return a


def table(rows: list[dict[str, Any]], a: Assumptions) -> str:
    out = [f"{'published run':26} {'role':16} {'GPUs':>4} {'micro':>5} {'batch':>5} {'px':>4} {'precision':9} "
           f"{'precomputed':12} {'GFLOP':>5} {'measured':>8} {'predicted':>9} {'error':>7} {'MFU':>5}"]
    for r in rows:
        out.append(f"{r['run']:26} {r['role']:16} {r['gpus']:4d} {r['micro_batch']:5d} {r['global_batch']:5d} "
                   f"{r['resolution']:4d} {r['precision']:9} {r['precomputed']:12} {r['gflops_per_sample']:5d} "
                   f"{r['measured']:8.1f} {r['predicted']:9.1f} {r['error']:+7.1%} {r['measured_mfu']:5.3f}")
    worst = max(abs(r["error"]) for r in rows if r["role"] == "validation")
    out.append(f"images/s per GPU; MFU = measured images/s x GFLOP executed per sample / peak. Fitted: efficiency "
               f"{a.efficiency:.4f} on {EFFICIENCY_RUN}, network_efficiency {a.network_efficiency:.4f} on "
               f"{NETWORK_RUN}; worst validation error {worst:.1%} (band +-{VALIDATION_BAND:.0%})")
    out += ["sources:"] + sorted({f"  {r['source']}" for r in rows})
    return "\n".join(out)


def main(as_json: bool = False) -> int:
    a = fit()
    rows = [predict(r, a) for r in PUBLISHED]
    print(json.dumps({"assumptions": dataclasses.asdict(a), "band": VALIDATION_BAND, "runs": rows}) if as_json
          else table(rows, a))
    return 0


# networks for the scaling study: per-GPU inter-node bandwidth in GB/s (None: the GPU preset's InfiniBand)
NETWORKS = {"infiniband (gpu preset)": None, "ethernet 400 Gb/s per node": 400 / 8, "ethernet 100 Gb/s per node": 100 / 8}
WORLDS = (8, 16, 64, 128, 256, 512)


def scaling(cfg: Any, prof: ModelProfile, gpu: GPU, per_node: int, a: Assumptions) -> list[dict[str, Any]]:
    """Weak scaling (the per-GPU batch of the preset kept, the global batch grows with the GPUs) of every micro-batch
    x ZeRO stage that fits, without checkpointing: samples/s/GPU at each world size and its ratio to 8 GPUs."""
    from omegaconf import OmegaConf

    per_gpu = int(cfg.train.global_batch) // 8
    rows = []
    for network, node_gbs in NETWORKS.items():
        net_gpu = gpu if node_gbs is None else dataclasses.replace(gpu, network_gbs=node_gbs / per_node)
        for micro in (b for b in range(1, per_gpu + 1) if per_gpu % b == 0):
            for zero in (1, 2, 3):
                speed = {}
                for world in WORLDS:
                    node = OmegaConf.merge(cfg, {"train": {"global_batch": per_gpu * world}})
                    p = evaluate(node, prof, net_gpu, max(1, world // per_node), min(world, per_node), micro, False,
                                 zero, a)
                    speed[world] = (p.samples_per_s_per_gpu, p.fits) if p else (0.0, False)
                if all(fits for _, fits in speed.values()):
                    rows.append({"network": network, "micro_batch": micro, "accumulation": per_gpu // micro,
                                 "zero": zero, "samples_per_s_per_gpu": {w: s for w, (s, _) in speed.items()},
                                 "efficiency": {w: round(s / speed[8][0], 3) for w, (s, _) in speed.items()}})
    return rows


def scaling_report(cfg: Any, prof: ModelProfile, gpu: GPU, per_node: int, a: Assumptions) -> str:
    rows = scaling(cfg, prof, gpu, per_node, a)
    head = (f"weak scaling of {cfg.experiment_name} on {gpu.name} ({per_node} per node, {int(cfg.train.global_batch) // 8}"
            f" samples per GPU per step; efficiency {a.efficiency}, network_efficiency {a.network_efficiency}; "
            f"estimates within +-{VALIDATION_BAND:.0%} of published runs)")
    out = [head, f"{'network':28} {'micro':>5} {'accum':>5} {'zero':>4} " + " ".join(f"{w:>6}" for w in WORLDS)
           + "   (samples/s/GPU relative to 8 GPUs)"]
    for r in rows:
        out.append(f"{r['network']:28} {r['micro_batch']:5d} {r['accumulation']:5d} {r['zero']:4d} "
                   + " ".join(f"{r['efficiency'][w]:6.3f}" for w in WORLDS))
    for network in NETWORKS:
        top = max((r for r in rows if r["network"] == network), key=lambda r: r["samples_per_s_per_gpu"][512])
        out.append(f"best at 512 GPUs on {network}: micro-batch {top['micro_batch']}, ZeRO-{top['zero']}: "
                   f"{top['samples_per_s_per_gpu'][512]} samples/s/GPU, {top['efficiency'][512]:.0%} of 8 GPUs")
    out.append("DeepSpeed's bucket sizes set memory (plan's fixed part) and overlap, which this model does not "
               "credit: traffic per step depends on the ZeRO stage and the accumulation only")
    return "\n".join(out)
