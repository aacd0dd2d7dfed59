"""The diffusion library: schedules, the training loss, samplers and classifier-free guidance.

Pure functions on tensors (torch only, no I/O, no globals), k-diffusion style: the trainer and eval
only wire them to a model. Conventions are the paper's code (CompVis latent-diffusion), and each piece
is tested step for step against diffusers (tests/diffusion/).

Schedule (``schedule.py``)::

    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)   # the paper; .to(device)
    schedule.alphas_cumprod, schedule.snr(t), min_snr_weight(snr, gamma, "eps")

``"scaled_linear"`` is what CompVis configs call ``linear`` (linspace of sqrt(beta), squared, every released
LDM); ``"sqrt_linear"`` is plain linspace (DDPM; diffusers' ``linear``), ``"sqrt"`` CompVis' ``sqrt`` and
``"cosine"`` Nichol & Dhariwal. ``"linear"`` alone is refused as ambiguous; ``from_compvis_name`` translates a
CompVis config's name. Tables are computed in float64 and stored float32, as CompVis does.

Training loss (``losses.py``)::

    t = sample_timesteps(B, schedule, generator, device)            # uniform in [0, T)
    noise = torch.randn_like(z)
    model_fn = lambda x_t, t: unet(x_t, t, context=text_encoder(tokens))
    loss = diffusion_loss(model_fn, z, t, noise, schedule, parameterization="eps",
                          min_snr_gamma=None).mean()               # per-sample [B] before .mean()

One training step (``step.py``), as the trainer and the benchmarks run it::

    t, noise = draw_t_and_noise(z0, T, offset_noise, generator)
    loss = training_loss(model, z0, cond, t, noise)                # LatentDiffusion.forward is ldm_loss

``q_sample``, ``v_target`` and the conversions ``pred_x0_from_eps``, ``pred_x0_from_v``, ``eps_from_v``,
``v_from_eps``, ``to_eps`` share the notation ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``,
``v = sqrt(a) eps - sqrt(1 - a) x0``. Min-SNR-gamma weights the eps loss by ``min(snr, g) / snr`` and the
v loss by ``min(snr, g) / (snr + 1)``; with ``g = inf`` the eps weight is 1 and the weighted v loss equals
the eps loss of the same prediction; ``None`` disables it.

Sampling (``samplers.py``)::

    gens = [torch.Generator().manual_seed(seed + i) for i in sample_indices]   # rank-independent
    model_fn = cfg_model_fn(unet, {"context": c}, {"context": c_empty}, guidance_scale=1.5)
    z = ddim_sample(model_fn, schedule, (B, 4, 32, 32), num_steps=250, eta=0.0,
                    generator=gens, device="cuda")                 # or x_T=..., noise=[...]
    z = plms_sample(model_fn, schedule, shape, num_steps=50, generator=gens)
    z = ddpm_sample(model_fn, schedule, shape, generator=gens)      # all 1000 steps, or num_steps=

- Timesteps: ``"leading"`` spacing with ``steps_offset=1`` (diffusers DDIM/PNDM as Stable Diffusion configures
  them, and CompVis ``make_ddim_timesteps`` uniform when S divides T: 250 steps visit 997, 993, ..., 1;
  ``"uniform_compvis"`` is CompVis' for any S, e.g. 31 steps for 30); the final
  DDIM/PLMS step lands on ``alphas_cumprod[0]`` (diffusers ``set_alpha_to_one=False``). ``"trailing"``
  is available. DDPM with ``num_steps=None`` is CompVis ``p_sample_loop``; with ``num_steps`` it is
  respaced and ends on clean data.
- ``parameterization="v"`` converts the model's v to eps at each step's own x and t (SD2's CompVis
  PLMS does the same; diffusers' PNDM combines raw v's instead, so they differ for v only).
- ``cfg_model_fn`` runs ``[uncond; cond]`` in one batched forward per step; a mapping conditioning is
  concatenated key by key and passed as keywords; ``guidance_scale`` float or per-sample [B] tensor;
  a float 1 skips the unconditional half.
- ``callback(i, t, x, pred_x0)`` after each step; ``progress=True`` shows a tqdm bar. No clipping of
  x0 is done (CompVis samples latents unclipped).
"""
from ldm_train.diffusion.losses import (
    diffusion_loss,
    eps_from_v,
    pred_x0_from_eps,
    pred_x0_from_v,
    q_sample,
    sample_timesteps,
    to_eps,
    v_from_eps,
    v_target,
)
from ldm_train.diffusion.samplers import (
    cfg_model_fn,
    ddim_sample,
    ddpm_sample,
    make_timesteps,
    plms_sample,
    randn,
)
from ldm_train.diffusion.schedule import (
    BETA_SCHEDULES,
    DiffusionSchedule,
    from_compvis_name,
    make_beta_schedule,
    make_schedule,
    min_snr_weight,
)

__all__ = [
    "BETA_SCHEDULES",
    "DiffusionSchedule",
    "cfg_model_fn",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_loss",
    "eps_from_v",
    "from_compvis_name",
    "make_beta_schedule",
    "make_schedule",
    "make_timesteps",
    "min_snr_weight",
    "plms_sample",
    "pred_x0_from_eps",
    "pred_x0_from_v",
    "q_sample",
    "randn",
    "sample_timesteps",
    "to_eps",
    "v_from_eps",
    "v_target",
]
