"""Memory and throughput planner: ``python -m ldm_train.plan experiment=txt2img_1p45b gpu=a100-80g nodes=1
gpus_per_node=8 [micro_batch=5 checkpointing=true zero=2] [--json]``; ``--published``: the step-time model against
published Stable Diffusion 2 training runs (``ldm_train.calibration``); ``--scaling``: the preset's weak scaling from 8
to 512 GPUs on InfiniBand- and Ethernet-class networks.

For every candidate (micro-batch that divides the global batch x activation checkpointing on/off x ZeRO stage 1/2/3)
it estimates the per-GPU memory and the optimizer-step time, prints them as a table, and names the fastest plan
that fits. With ``micro_batch=`` / ``checkpointing=`` / ``zero=`` (default: the experiment's own settings) it exits
with status 2 when that plan does not fit, before any job is submitted. The trainer prints the same estimate for its
configured plan at start on a GPU.

**Memory per GPU** = activations + fixed.

- Activations: a live-storage count (``ldm_train.memory``) of the real model's forward + backward on the meta device,
  in the training precision, at micro-batch 1 and 2 (activations are linear in the batch), with the flash attention
  kernel a GPU runs. On CPU at reduced width this count matches the same step on real tensors to 0.5%, and the
  process's resident-memory growth (``tests/ldm_train/test_plan.py``).
- Fixed (P = trained parameters, W = data-parallel ranks; bytes): 16-bit weights 2P (ZeRO-3: 2P/W plus the gathered
  working set, ``stage3_max_live_parameters``), gradients 2P in bf16 (4P with ``grad_accum_dtype: fp32``; ZeRO-2/3:
  that over W), fp32 master 4P/W, Adam moments 8P/W, the fp32 gradient partition 4P/W, DeepSpeed's buckets (reduce +
  allgather bucket elements x 2 bytes, x 4.5 with ``overlap_comm`` as DeepSpeed documents), the EMA (4P/W: each rank
  averages its own part of the fp32 master in place, ``ldm_train.ema``), and
  ``runtime_gib`` (CUDA context, cuBLAS/NCCL workspaces: 2 GiB). A plan fits when the sum is at most ``headroom``
  (0.92) of the device memory.

**Step time** (an estimate, not a measurement): compute = samples per GPU x FLOPs executed per sample (model FLOPs
from ``ldm_train.flops``; checkpointing adds one more forward) / (peak x ``efficiency``), per micro-step at least
``launch_us`` per dispatched operator (the host launches while the device computes, so it only sets the pace when
the kernels are shorter: small micro-batches), plus the gradient and parameter traffic of the ZeRO stage over NVLink
(one node) or the inter-node link, not overlapped with compute. Ring collectives on a rail-optimised fabric (one NIC
per GPU, each carrying one ring) use all of a node's NICs: the inter-node bus bandwidth is the NIC bandwidth per GPU x
GPUs per node, at most NVLink's; the collectives reach ``network_efficiency`` of it.
MFU = model FLOPs per step / (step time x peak x W). ``efficiency`` and ``network_efficiency`` are fitted to published
runs (``python -m ldm_train.plan --published``: efficiency on MosaicML's 8 x A100 Stable Diffusion 2 run at 256 px,
network efficiency on NVIDIA's 512 x H100 MLPerf run; the other published runs are the validation, predicted within
``VALIDATION_BAND``). ``launch_us`` (6) and the link speeds are stated assumptions, printed with the plan; the GPU
run (``bench/gpu_check.sh``) is what checks them on our own model.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16
    nvlink_gbs: float  # per GPU, one direction, GB/s
    network_gbs: float  # per GPU between nodes, GB/s


GPUS = {
    "a100-40g": GPU("a100-40g", 40.0, 312.0, 300.0, 25.0),  # NVLink3; 8 x 200 Gb/s HDR per node
    "a100-80g": GPU("a100-80g", 80.0, 312.0, 300.0, 25.0),
    "h100-80g": GPU("h100-80g", 80.0, 989.0, 450.0, 50.0),  # NVLink4; 8 x 400 Gb/s NDR per node
    "h200": GPU("h200", 141.0, 989.0, 450.0, 50.0),
    "b200": GPU("b200", 180.0, 2250.0, 900.0, 50.0),  # NVLink5; 8 x 400 Gb/s ConnectX-7 per node
}
# the worst relative error of the calibrated step-time model over the published validation runs
# (ldm_train.calibration; tests/ldm_train/test_calibration.py recomputes it)
VALIDATION_BAND = 0.26


@dataclass
class Assumptions:
    efficiency: float = 0.2397  # achieved share of peak on the model's FLOPs: fitted (ldm_train.calibration)
    network_efficiency: float = 0.6267  # achieved share of the link's bandwidth by the collectives: fitted
    launch_us: float = 6.0  # host + launch cost per dispatched operator
    runtime_gib: float = 2.0  # CUDA context, cuBLAS / NCCL workspaces
    headroom: float = 0.92  # share of device memory a plan may use (allocator fragmentation)


@dataclass
class Plan:
    micro_batch: int
    checkpointing: bool
    zero: int
    accumulation: int
    activations_gib: float
    fixed_gib: float
    total_gib: float
    fits: bool
    step_s: float
    samples_per_s_per_gpu: float
    mfu: float
    parts_gib: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelProfile:
    """What the plan needs from the model, measured once per checkpointing setting."""

    params: int  # trained parameters (UNet + cond stage)
    flops_per_sample: float  # forward + backward, no recomputation
    forward_flops_per_sample: float
    act_bytes: dict[bool, tuple[float, float]]  # checkpointing -> (bytes at batch 0, bytes per sample)
    ops: dict[bool, tuple[float, float]]  # checkpointing -> (operators at batch 0, per sample): ~constant
    bytes_per_param: int  # 2 (bf16 / fp16) or 4 (fp32)


def _inputs(cfg: Any, batch: int, dtype: torch.dtype):
    from ldm_train.config import cond_config

    unet = cfg.unet
    side, concat = int(unet.image_size), int(unet.concat_channels)
    channels = int(unet.in_channels) - concat
    kind = cond_config(cfg).kind

    def make() -> tuple:
        z0 = torch.randn(batch, channels, side, side, dtype=dtype)
        if kind == "text":
            cond = torch.zeros(batch, int(cfg.text_encoder.max_seq_len), dtype=torch.long)
        elif kind == "class":
            cond = torch.zeros(batch, dtype=torch.long)
        elif kind == "concat":
            cond = torch.randn(batch, concat, side, side, dtype=dtype)
        else:
            cond = None
        t = torch.zeros(batch, dtype=torch.long)
        return z0, cond, t, torch.randn_like(z0)

    return make


def activation_count(cfg: Any, batch: int, checkpointing: bool, device: str = "meta") -> tuple[int, int]:
    """(peak activation bytes, operators) of one training micro-step of the composed model, on ``device``."""
    from ldm_train.build import build_ldm
    from ldm_train.memory import flash_attention, step_activation_bytes
    from ldm_train.runtime.precision import precision_dtype

    dtype = precision_dtype(str(cfg.train.precision), "train.precision")
    with torch.device(device), flash_attention():
        model = build_ldm(cfg, activation_checkpointing=checkpointing).to(dtype).train()
        return step_activation_bytes(model, _inputs(cfg, batch, dtype))


def profile(cfg: Any) -> ModelProfile:
    from ldm_train.flops import summarize

    s = summarize(cfg)
    fwd = (s["unet_forward_gflops"] + s["text_encoder_forward_gflops"]) * 1e9
    act, ops = {}, {}
    for ckpt in (False, True):
        (a1, o1), (a2, o2) = activation_count(cfg, 1, ckpt), activation_count(cfg, 2, ckpt)
        act[ckpt] = (2 * a1 - a2, a2 - a1)
        ops[ckpt] = (2 * o1 - o2, o2 - o1)
    bpp = 4 if str(cfg.train.precision) == "fp32" else 2
    return ModelProfile(int(s["trainable_params"]), float(s["train_flops_per_sample"]), fwd, act, ops, bpp)


def _ds(cfg: Any, key: str, default: Any) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, f"deepspeed.zero_optimization.{key}", default=None)
    return default if value is None else value


def fixed_parts(cfg: Any, prof: ModelProfile, zero: int, world: int) -> dict[str, float]:
    from omegaconf import OmegaConf

    p, w, b = prof.params, world, prof.bytes_per_param
    accum = OmegaConf.select(cfg, "deepspeed.data_types.grad_accum_dtype", default=None)
    grad_b = 4 if accum == "fp32" or b == 4 else 2
    overlap = 4.5 if _ds(cfg, "overlap_comm", True) else 1.0
    parts = {
        "weights": b * p / (w if zero == 3 else 1),
        "gradients": grad_b * p / (w if zero >= 2 else 1),
        "fp32_master": (4 * p / w) if b != 4 else 0.0,
        "adam_moments": 8 * p / w,
        "fp32_grad_partition": (4 * p / w) if b != 4 else 0.0,
        "buckets": 2 * overlap * (min(p, float(_ds(cfg, "reduce_bucket_size", 5e8)))
                                  + (min(p, float(_ds(cfg, "allgather_bucket_size", 5e8))) if zero < 3 else 0.0)),
        # the EMA: each rank's part of the fp32 master, averaged in place (ldm_train.ema: ZeRO-1/2 master fragments,
        # ZeRO-3 partitions; no temporary)
        "ema": 4 * p / w,
    }
    if zero == 3:
        parts["gathered_params"] = b * min(p, float(_ds(cfg, "stage3_max_live_parameters", 1e9)))
    return parts


def comm_bytes_per_step(prof: ModelProfile, zero: int, accumulation: int) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives: reduce-scatter + all-gather ~ 2 x the tensor)."""
    grads = prof.bytes_per_param * prof.params
    if zero == 1:
        return 2 * grads  # gradients reduced once per step, 16-bit weights all-gathered after it
    if zero == 2:
        return grads * accumulation + grads  # reduce-scatter every micro-step, all-gather after the step
    return 3 * grads * accumulation  # weights gathered for forward and backward, gradients scattered, per micro-step


def comm_s(prof: ModelProfile, gpu: GPU, nodes: int, per_node: int, zero: int, accumulation: int,
           a: Assumptions) -> float:
    """Seconds of ZeRO traffic per optimizer step: NVLink within a node; across nodes the ring crosses each node's
    NICs in parallel (rail-optimised), so the bus bandwidth is NIC per GPU x GPUs per node, capped by NVLink."""
    world = nodes * per_node
    if world == 1:
        return 0.0
    link = gpu.nvlink_gbs if nodes == 1 else min(gpu.nvlink_gbs, gpu.network_gbs * per_node)
    return comm_bytes_per_step(prof, zero, accumulation) * (world - 1) / world / (link * 1e9 * a.network_efficiency)


def micro_step_s(prof: ModelProfile, gpu: GPU, micro_batch: int, checkpointing: bool, a: Assumptions) -> float:
    """One micro-step's time: the host launches while the device computes, so whichever is longer sets the pace
    (checkpointing executes one more forward)."""
    executed = prof.flops_per_sample + (prof.forward_flops_per_sample if checkpointing else 0.0)
    o0, o1 = prof.ops[checkpointing]
    return max(micro_batch * executed / (gpu.peak_tflops * 1e12 * a.efficiency),
               (o0 + o1 * micro_batch) * a.launch_us * 1e-6)


def evaluate(cfg: Any, prof: ModelProfile, gpu: GPU, nodes: int, per_node: int, micro_batch: int,
             checkpointing: bool, zero: int, a: Assumptions) -> Plan | None:
    world = nodes * per_node
    global_batch = int(cfg.train.global_batch)
    if global_batch % (micro_batch * world):
        return None
    accumulation = global_batch // (micro_batch * world)
    a0, a1 = prof.act_bytes[checkpointing]
    acts = a0 + a1 * micro_batch
    parts = fixed_parts(cfg, prof, zero, world)
    fixed = sum(parts.values()) + a.runtime_gib * GIB
    total = acts + fixed
    per_gpu_samples = micro_batch * accumulation
    step = accumulation * micro_step_s(prof, gpu, micro_batch, checkpointing, a) + comm_s(
        prof, gpu, nodes, per_node, zero, accumulation, a)
    return Plan(micro_batch, checkpointing, zero, accumulation, round(acts / GIB, 2), round(fixed / GIB, 2),
                round(total / GIB, 2), total <= a.headroom * gpu.memory_gib * GIB, round(step, 3),
                round(per_gpu_samples / step, 2),
                round(global_batch * prof.flops_per_sample / (step * gpu.peak_tflops * 1e12 * world), 4),
                {k: round(v / GIB, 2) for k, v in parts.items()})


def plans(cfg: Any, prof: ModelProfile, gpu: GPU, nodes: int, per_node: int, a: Assumptions) -> list[Plan]:
    world = nodes * per_node
    per_gpu = int(cfg.train.global_batch) // world if int(cfg.train.global_batch) % world == 0 else 0
    batches = [b for b in range(1, per_gpu + 1) if per_gpu % b == 0]
    out = [evaluate(cfg, prof, gpu, nodes, per_node, b, c, z, a)
           for b, c, z in itertools.product(batches, (False, True), (1, 2, 3))]
    return [p for p in out if p is not None]


def best(candidates: list[Plan]) -> Plan | None:
    fitting = [p for p in candidates if p.fits]
    return min(fitting, key=lambda p: (p.step_s, p.total_gib)) if fitting else None


def gpu_for(name: str | None) -> GPU:
    """The named preset, or the CUDA device present (its memory and peak); an unknown name is refused."""
    if name:
        if name not in GPUS:
            raise ValueError(f"gpu={name}: use one of {sorted(GPUS)} (or run on the GPU to plan for it)")
        return GPUS[name]
    if not torch.cuda.is_available():
        raise ValueError("no GPU here: name one with gpu=" + "|".join(sorted(GPUS)))
    from ldm_train.runtime.devices import device_peak_tflops, peak_tflops_for_name

    dev = torch.cuda.get_device_properties(0)
    peak = device_peak_tflops("cuda")
    if peak is None:
        raise ValueError(f"{dev.name}: peak FLOP/s unknown (ldm_train/runtime/devices.py); name a gpu= preset")
    like = next((g for g in GPUS.values() if peak_tflops_for_name(g.name) == peak), GPUS["h100-80g"])
    return dataclasses.replace(like, name=dev.name, memory_gib=dev.total_memory / GIB, peak_tflops=peak)


def table(candidates: list[Plan], chosen: Plan | None, configured: Plan | None) -> str:
    rows = ["micro  ckpt  zero  accum  act GiB  fixed GiB  total GiB  fits  step s  samples/s/GPU  MFU"]
    for p in sorted(candidates, key=lambda p: (p.zero, p.checkpointing, p.micro_batch)):
        mark = " <- best" if p == chosen else (" <- configured" if p == configured else "")
        rows.append(f"{p.micro_batch:5d}  {'on ' if p.checkpointing else 'off'}  {p.zero:4d}  {p.accumulation:5d}  "
                    f"{p.activations_gib:7.2f}  {p.fixed_gib:9.2f}  {p.total_gib:9.2f}  {'yes' if p.fits else ' no'}  "
                    f"{p.step_s:6.2f}  {p.samples_per_s_per_gpu:13.1f}  {p.mfu:.3f}{mark}")
    return "\n".join(rows)


def configured_settings(cfg: Any) -> tuple[int, bool, int]:
    return (int(cfg.train.micro_batch), bool(cfg.unet.use_checkpoint),
            int(_ds(cfg, "stage", 2)))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(x in ("-h", "--help") for x in args):
        print(__doc__)
        return 0
    as_json = "--json" in args
    if "--published" in args:
        from ldm_train.calibration import main as published

        return published(as_json)
    opts = {k: v for k, _, v in (x.partition("=") for x in args if x.split("=", 1)[0] in (
        "gpu", "nodes", "gpus_per_node", "micro_batch", "checkpointing", "zero",
        "efficiency", "network_efficiency", "launch_us", "runtime_gib", "headroom"))}
    overrides = [x for x in args if x not in ("--json", "--scaling") and x.split("=", 1)[0] not in opts]
    from ldm_train.summary import compose_config

    cfg = compose_config(overrides)
    gpu = gpu_for(opts.get("gpu"))
    nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("gpus_per_node", 8))
    a = Assumptions(**{k: float(opts[k]) for k in (
        "efficiency", "network_efficiency", "launch_us", "runtime_gib", "headroom") if k in opts})
    prof = profile(cfg)
    if "--scaling" in args:
        from ldm_train.calibration import scaling_report

        print(scaling_report(cfg, prof, gpu, per_node, a))
        return 0
    candidates = plans(cfg, prof, gpu, nodes, per_node, a)
    if not candidates:
        print(f"[plan] train.global_batch={cfg.train.global_batch} is not a multiple of {nodes * per_node} GPUs",
              file=sys.stderr)
        return 2
    chosen = best(candidates)
    mb, ck, z = configured_settings(cfg)
    mb = int(opts.get("micro_batch", mb))
    ck = str(opts.get("checkpointing", ck)).lower() in ("true", "1", "on", "yes")
    z = int(opts.get("zero", z))
    configured = evaluate(cfg, prof, gpu, nodes, per_node, mb, ck, z, a)
    report = {"gpu": dataclasses.asdict(gpu), "nodes": nodes, "gpus_per_node": per_node,
              "global_batch": int(cfg.train.global_batch), "trained_params": prof.params,
              "train_gflops_per_sample": round(prof.flops_per_sample / 1e9, 1),
              "activation_bytes_per_sample": {("on" if k else "off"): v[1] for k, v in prof.act_bytes.items()},
              "assumptions": dataclasses.asdict(a), "best": chosen and dataclasses.asdict(chosen),
              "configured": configured and dataclasses.asdict(configured),
              "plans": [dataclasses.asdict(p) for p in candidates]}
    if as_json:
        print(json.dumps(report))
    else:
        print(f"[plan] {nodes} x {per_node} x {gpu.name} ({gpu.memory_gib:.0f} GiB, {gpu.peak_tflops:.0f} TFLOP/s "
              f"bf16), global batch {cfg.train.global_batch}, {prof.params:,} trained parameters, "
              f"{prof.flops_per_sample / 1e9:.1f} GFLOP per sample; assumptions {dataclasses.asdict(a)}")
        print(f"[plan] step times are estimates: with these constants the model predicts published Stable Diffusion 2"
              f" training runs within +-{VALIDATION_BAND:.0%} (python -m ldm_train.plan --published)")
        print(table(candidates, chosen, configured))
        if chosen:
            print(f"[plan] best: train.micro_batch={chosen.micro_batch} checkpointing="
                  f"{'on' if chosen.checkpointing else 'off'} deepspeed=zero{chosen.zero}: {chosen.total_gib} GiB, "
                  f"{chosen.samples_per_s_per_gpu} samples/s/GPU, MFU {chosen.mfu} (estimated, "
                  f"+-{VALIDATION_BAND:.0%})")
    if configured is None:
        print(f"[plan] the configured micro-batch {mb} does not divide the global batch over {nodes * per_node} GPUs",
              file=sys.stderr)
        return 2
    if not configured.fits:
        print(f"[plan] the configured plan (micro-batch {mb}, checkpointing {'on' if ck else 'off'}, ZeRO-{z}) needs "
              f"{configured.total_gib} GiB of {gpu.memory_gib:.0f} GiB: it does not fit"
              + (f"; use train.micro_batch={chosen.micro_batch} unet.use_checkpoint={str(chosen.checkpointing).lower()} "
                 f"text_encoder.use_checkpoint={str(chosen.checkpointing).lower()} deepspeed=zero{chosen.zero}"
                 if chosen else "; no plan fits: more GPUs, or a smaller model"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def startup_line(cfg: Any, world_size: int, gpus_per_node: int) -> str:
    """The trainer's start-up line on a GPU: the configured plan's estimated memory and MFU on the device present,
    and the planner's best plan when it differs."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    gpu = gpu_for(None)
    per_node = max(1, min(gpus_per_node, world_size))
    nodes = max(1, world_size // per_node)
    a = Assumptions()
    prof = profile(node)
    mb, ck, z = configured_settings(node)
    mine = evaluate(node, prof, gpu, nodes, per_node, mb, ck, z, a)
    if mine is None:
        return "plan: the micro-batch does not divide the global batch over the GPUs"
    line = (f"plan (estimate, {gpu.name}): {mine.total_gib} GiB of {gpu.memory_gib:.0f} GiB "
            f"(activations {mine.activations_gib}), {mine.samples_per_s_per_gpu} samples/s/GPU, MFU {mine.mfu}"
            + ("" if mine.fits else " -- does NOT fit"))
    top = best(plans(node, prof, gpu, nodes, per_node, a))
    if top is not None and (top.micro_batch, top.checkpointing, top.zero) != (mb, ck, z):
        line += (f"; best: train.micro_batch={top.micro_batch} checkpointing={'on' if top.checkpointing else 'off'} "
                 f"zero{top.zero} ({top.total_gib} GiB, MFU {top.mfu}; python -m ldm_train.plan)")
    return line


def single_device_estimate(cfg: Any, gpu: GPU, micro_batch: int, a: Assumptions | None = None) -> dict[str, Any]:
    """The estimate ``bench/gpu_check.py`` prints beside its measurement: one device, no DeepSpeed, fp32 weights
    with bf16 autocast and AdamW (16 bytes per parameter: weights, gradients, two moments) plus the activations
    (counted in the training precision, as DeepSpeed runs them; autocast keeps some in fp32, so a measured peak can
    be higher)."""
    a = a or Assumptions()
    prof = profile(cfg)
    ckpt = bool(cfg.unet.use_checkpoint)
    a0, a1 = prof.act_bytes[ckpt]
    step = micro_step_s(prof, gpu, micro_batch, ckpt, a)
    acts, fixed = a0 + a1 * micro_batch, 16 * prof.params + a.runtime_gib * GIB
    return {"gpu": gpu.name, "micro_batch": micro_batch, "checkpointing": ckpt,
            "activations_gib": round(acts / GIB, 2), "fixed_gib": round(fixed / GIB, 2),
            "total_gib": round((acts + fixed) / GIB, 2), "step_s": round(step, 4),
            "samples_per_s": round(micro_batch / step, 2),
            "mfu": round(micro_batch * prof.flops_per_sample / (step * gpu.peak_tflops * 1e12), 4),
            "assumptions": dataclasses.asdict(a)}
