"""The one-step probe: a pipeline's single denoising step, recorded once and replayed with the UNet called directly.

The reference (apple/ml-stable-diffusion `mixed_bit_compression_pre_analysis.py`) runs the whole pipeline
for every measurement. `OneStepProbe` runs it once and records its single denoising step (the UNet's exact
inputs, the initial latents, the scheduler's state and the generator's state at the step); every later
evaluation replays exactly that math with the UNet called directly:
`noise = unet(*inputs)`, `noise = uncond + g * (text - uncond)`, `latents = scheduler.step(noise, t, latents)`.
A test proves the replay is bitwise equal to `pipe(prompts, negative_prompt=[""]*n, num_inference_steps=1,
output_type="latent", generator=...)`.

Example:
    >>> probe = OneStepProbe(pipe, ["a red circle"], seed=0)
    >>> with palettized(pipe.unet, {"down_blocks.1.attentions.0.proj_in": 2}):
    ...     probe.psnr()  # the reference PSNR per prompt against the float model's latents
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Collection, Sequence

import torch

from workbench.metrics import PSNR_PEAK_EPS, psnr_per_item
from workbench.models.layers import gradient_checkpointing
from workbench.sweep.replay import DEFAULT_REPLAY_MEMORY, UpstreamReplay
from workbench.threads import release_free_heap


class OneStepProbe:
    """Record `pipe(prompts, negative_prompt=[""]*n, num_inference_steps=1, output_type="latent",
    generator=Generator().manual_seed(seed))` once, then replay its denoising step for any UNet weights.

    The recording run captures the UNet's call (positional and keyword inputs: the CFG batch after
    `scale_model_input`, the timestep, the prompt embeddings and, for SDXL, `added_cond_kwargs`), the latents
    and keyword arguments handed to `scheduler.step`, a copy of the scheduler's state and the generator's state
    just before that step. A replay calls the UNet on the same inputs, applies the pipeline's guidance
    (`uncond + guidance_scale * (text - uncond)`, and `rescale_noise_cfg` if `guidance_rescale > 0`), and
    steps a fresh copy of the recorded scheduler: the same operations on the same tensors as the pipeline.

    Attributes:
        reference (`torch.Tensor`): the recording run's output latents, (n_prompts, C, h, w).
        forward_seconds (`float`): wall time spent inside UNet calls made by `__call__` and
            `distortion_gradient` (perf_counter; backward passes included).
        forward_calls (`int`): number of such calls (a gradient counts its forward with backward, or with
            `batch_chunk` its forward and each chunk's).
        replay (`UpstreamReplay` or None): the float model's upstream computation, recorded at the first call
            told which layers changed; `replay_memory` (bytes, defaults to 1 GiB) bounds it, set before that call.
    """

    @torch.no_grad()
    def __init__(
        self, pipe, prompts: Sequence[str], seed: int = 0, height: int | None = None, width: int | None = None
    ):
        self.pipe = pipe
        self.prompts = list(prompts)
        self.seed = seed
        self.device = pipe.unet.device
        captured: dict = {}

        def unet_hook(module, args, kwargs):
            captured.setdefault("unet", (args, dict(kwargs)))

        scheduler = pipe.scheduler
        original_step = scheduler.step

        @functools.wraps(original_step)  # keeps the signature the pipeline inspects for eta/generator
        def step(model_output, timestep, sample, *args, **kwargs):
            if "step" not in captured:
                generator = kwargs.get("generator")
                state = copy.deepcopy(scheduler)
                state.__dict__.pop("step", None)  # the copy must not carry this wrapper (bound to the original)
                captured["step"] = {
                    "scheduler": state,
                    "timestep": timestep,
                    "sample": sample.clone(),
                    "args": args,
                    "kwargs": {k: v for k, v in kwargs.items() if k != "generator"},
                    "generator_state": None if generator is None else generator.get_state(),
                }
            return original_step(model_output, timestep, sample, *args, **kwargs)

        handle = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
        scheduler.step = step
        try:
            self.reference = self.run_pipeline(height=height, width=width)
        finally:
            handle.remove()
            del scheduler.step  # drop the instance attribute: the class method is back
        if "unet" not in captured or "step" not in captured:
            raise RuntimeError(f"{type(pipe).__name__} did not call its UNet and scheduler.step once; cannot probe it")
        self._unet_args, self._unet_kwargs = captured["unet"]
        self._step = captured["step"]
        self.guidance_scale = float(getattr(pipe, "guidance_scale", 1.0))
        self.guidance_rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        self.do_cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        self.height, self.width = height, width
        self.forward_seconds = 0.0
        self.forward_calls = 0
        self.replay: UpstreamReplay | None = None
        self.replay_memory = DEFAULT_REPLAY_MEMORY

    def run_pipeline(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The reference's run: the full pipeline call, one step, latent output, fixed generator state."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        kwargs = {} if height is None else {"height": height}
        if width is not None:
            kwargs["width"] = width
        out = self.pipe(
            self.prompts,
            negative_prompt=[""] * len(self.prompts),
            num_inference_steps=1,
            output_type="latent",
            generator=generator,
            **kwargs,
        )
        return out.images

    @property
    def unet_batch(self) -> int:
        return int(self._unet_args[0].shape[0]) if self._unet_args else int(self._unet_kwargs["sample"].shape[0])

    @torch.no_grad()
    def __call__(self, changed: Collection[str] | None = None) -> torch.Tensor:
        """The step's output latents with the UNet's current weights; only the UNet call is timed.

        Args:
            changed (`Collection[str]`, *optional*): the only layers whose weights differ from the float model's
                now, if known: the UNet's computation upstream of the first of them is replayed from the float
                model's (`workbench.sweep.replay.UpstreamReplay`, recorded at the first such call; bitwise the same
                latents, faster). None: the whole forward runs.
        """
        unet = self.pipe.unet
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        if changed is None:
            noise = unet(*self._unet_args, **self._unet_kwargs)[0]
        else:
            if self.replay is None:
                self.replay = UpstreamReplay(unet, self.replay_memory)
            with self.replay.skipping(changed):
                noise = unet(*self._unet_args, **self._unet_kwargs)[0]
        synchronize()
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1
        return self._step_from(noise)

    def _step_from(self, noise: torch.Tensor) -> torch.Tensor:
        """The output latents from the UNet's output: guidance, then a fresh copy of the recorded scheduler."""
        if self.do_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + self.guidance_scale * (text - uncond)
            if self.guidance_rescale > 0.0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                noise = rescale_noise_cfg(noise, text, guidance_rescale=self.guidance_rescale)
        step = self._step
        scheduler = copy.deepcopy(step["scheduler"])
        kwargs = {**step["kwargs"], "return_dict": False}
        if step["generator_state"] is not None:
            kwargs["generator"] = torch.Generator(device=self.device)
            kwargs["generator"].set_state(step["generator_state"])
        return scheduler.step(noise, step["timestep"], step["sample"], *step["args"], **kwargs)[0]

    def _unet_inputs(self, rows: slice) -> tuple[tuple, dict]:
        """The recorded UNet inputs restricted to batch rows `rows` (every tensor with the batch's leading size)."""
        batch = self.unet_batch

        def cut(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                return x[rows]
            if isinstance(x, dict):
                return {k: cut(v) for k, v in x.items()}
            return x

        return tuple(cut(a) for a in self._unet_args), {k: cut(v) for k, v in self._unet_kwargs.items()}

    def distortion_gradient(
        self,
        params: Sequence[torch.Tensor],
        batch_chunk: int | None = None,
        weights: Sequence[float] | None = None,
        consume: Callable[[int, torch.Tensor], None] | None = None,
        checkpointing: bool = False,
    ) -> tuple[float, list[torch.Tensor]] | float:
        """The latent distortion with the UNet's current weights and its gradient with respect to `params`.

        The distortion is the one the allocation predicts, `D = mean_prompts mse_p / peak_p**2` (`peak_p` the
        reference PSNR's peak, held constant), so `10**(-psnr_p / 10)` averaged over prompts, unrounded. Without
        `batch_chunk`, one forward with autograd and one backward pass. With it, the UNet runs once without
        autograd, the gradient of D with respect to the UNet's output (through guidance and the scheduler step,
        which are cheap) is pulled back through the UNet in chunks of `batch_chunk` rows of its batch, so
        activation memory is bounded by the chunk (one more forward per chunk).

        Args:
            params (`Sequence[torch.Tensor]`): UNet parameters (e.g. the candidate layers' weights).
            batch_chunk (`int`, *optional*): UNet batch rows per backward pass; None = the whole batch at once.
            weights (`Sequence[float]`, *optional*): one per prompt: `D = mean_p weights_p mse_p / peak_p**2`
                (`workbench.recipes.refine.prompt_weights`); None = 1 each.
            consume (`Callable[[int, torch.Tensor], None]`, *optional*): called with `(i, gradient)` as the gradient
                of `params[i]` comes out of the backward pass (once per chunk with `batch_chunk`: the gradient is
                the sum of what it receives; never for a parameter D does not depend on), and dropped after it, so
                the gradients of all `params` are never held at once.
            checkpointing (`bool`, defaults to False): the UNet's gradient checkpointing during the backward pass
                (`workbench.models.layers.gradient_checkpointing`): the same gradient, activations of about one
                block instead of the whole UNet's, one more forward pass.

        Returns:
            `tuple[float, list[torch.Tensor]]`: D, and dD/dp for each of `params` (float32, on their device); with
            `consume`, D only.
        """
        start = time.perf_counter()
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with gradient_checkpointing(self.pipe.unet, checkpointing):
                distortion, grads = self._gradient(params, batch_chunk, weights, consume)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            release_free_heap()  # the backward pass' buffers, freed to the threads' arenas: back to the system
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - start
        return float(distortion.detach()) if consume is not None else (float(distortion.detach()), grads)

    def _gradient(self, params, batch_chunk, weights, consume) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """`distortion_gradient`'s passes, with `params` requiring grad: D, and the gradients (None with consume)."""
        if consume is not None:
            return self._consumed_gradient(params, batch_chunk, weights, consume), None
        if batch_chunk is not None and batch_chunk < self.unet_batch:
            return self._chunked_gradient(params, batch_chunk, weights)
        with torch.enable_grad():
            distortion = self._distortion(self.pipe.unet(*self._unet_args, **self._unet_kwargs)[0], weights)
            parts = torch.autograd.grad(distortion, params, allow_unused=True)
        self.forward_calls += 1
        zero = torch.zeros_like
        return distortion, [zero(p, dtype=torch.float32) if g is None else g.float() for p, g in zip(params, parts)]

    def _consumed_gradient(self, params, batch_chunk, weights, consume) -> torch.Tensor:
        """D, its gradient handed to `consume` parameter by parameter (post-accumulate hooks on a backward pass
        into `params` only), chunk by chunk with `batch_chunk`."""
        saved = [p.grad for p in params]

        def take(i: int, p: torch.Tensor) -> None:
            consume(i, p.grad.float())
            p.grad = None

        hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: take(i, p)) for i, p in enumerate(params)]
        try:
            for p in params:
                p.grad = None
            unet = self.pipe.unet
            if batch_chunk is None or batch_chunk >= self.unet_batch:
                with torch.enable_grad():
                    distortion = self._distortion(unet(*self._unet_args, **self._unet_kwargs)[0], weights)
                    torch.autograd.backward(distortion, inputs=list(params))
                self.forward_calls += 1
                return distortion
            distortion, upstream = self._output_gradient(weights)
            for first in range(0, self.unet_batch, batch_chunk):
                rows = slice(first, min(first + batch_chunk, self.unet_batch))
                args, kwargs = self._unet_inputs(rows)
                with torch.enable_grad():
                    chunk = unet(*args, **kwargs)[0]
                    torch.autograd.backward(chunk, upstream[rows].to(chunk.dtype), inputs=list(params))
                self.forward_calls += 1
            return distortion
        finally:
            for hook in hooks:
                hook.remove()
            for p, grad in zip(params, saved):
                p.grad = grad

    def _distortion(self, noise: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
        """D of the latents the UNet output `noise` steps to (differentiable; peaks held constant), each prompt
        weighted by `weights` if given."""
        out = self._step_from(noise.to(self.reference.dtype)).float()
        ref = self.reference.to(out.device, torch.float32)
        peak = out.detach().abs().flatten(1).amax(1).double() + PSNR_PEAK_EPS
        mse = (out - ref).square().flatten(1).mean(1)
        d = mse / peak.square().to(mse.dtype)
        if weights is not None:
            if len(weights) != len(d):
                raise ValueError(f"one weight per prompt: got {len(weights)} weights for {len(d)} prompts")
            d = d * torch.as_tensor(weights, dtype=d.dtype, device=d.device)
        return d.mean()

    def _output_gradient(self, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
        """D and its gradient with respect to the UNet's output (one forward without autograd)."""
        with torch.no_grad():
            noise = self.pipe.unet(*self._unet_args, **self._unet_kwargs)[0]
        self.forward_calls += 1
        with torch.enable_grad():
            noise = noise.detach().float().requires_grad_(True)
            distortion = self._distortion(noise, weights)
            (upstream,) = torch.autograd.grad(distortion, noise)
        return distortion, upstream

    def _chunked_gradient(self, params, batch_chunk: int, weights=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet = self.pipe.unet
        distortion, upstream = self._output_gradient(weights)
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for first in range(0, self.unet_batch, batch_chunk):
            rows = slice(first, min(first + batch_chunk, self.unet_batch))
            args, kwargs = self._unet_inputs(rows)
            with torch.enable_grad():
                chunk = unet(*args, **kwargs)[0]
                parts = torch.autograd.grad(chunk, params, upstream[rows].to(chunk.dtype), allow_unused=True)
            for g, part in zip(grads, parts):
                if part is not None:
                    g += part.float()
            self.forward_calls += 1
        return distortion, grads

    def psnr(self, latents: torch.Tensor | None = None, changed: Collection[str] | None = None) -> list[float]:
        """Reference PSNR (rounded to 0.1 dB) of each prompt's latent against the float model's: of `latents`, or
        of a step with the UNet's current weights (`changed` as `__call__` takes it)."""
        test = self(changed) if latents is None else latents
        return psnr_per_item(self.reference, test)
