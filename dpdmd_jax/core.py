"""The ground floor: the types every layer shares, and the interfaces between them.

Train state, round batch and frozen-model bundle (plain pytrees: the train step is a pure function
of them), the conditioning types of the two model families, and the protocols the engine speaks:
`Schedule` (a noise schedule), `Backbone` (a model family), `DataSource` (where conditionings come
from) and `Evaluator` (what the loop runs every so often). This module imports nothing of ours;
everything else imports downwards from it (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import flax
import jax
import ml_collections
import numpy as np

ArrayLike = jax.typing.ArrayLike
Params = Any  # a pytree of parameter arrays (nnx.State)
Cond = Any  # a backbone's conditioning pytree (`Backbone.cond_type`): [B, ...] arrays


# ---------------------------------------------------------------------------- conditionings


@flax.struct.dataclass
class SD3Cond:
    """SD3 / SD3.5 conditioning: context [B, L, 4096] (CLIP-L|G ++ T5), pooled [B, 2048]."""

    context: jax.Array
    pooled: jax.Array


@flax.struct.dataclass
class SDXLCond:
    """SDXL conditioning: context [B, 77, 2048], text_embeds [B, 1280] (pooled), time_ids [B, 6]."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array


# ---------------------------------------------------------------------------- train state


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses, a corrupt checkpoint); the message
    says what to do."""


@flax.struct.dataclass
class Pairs:
    """DMD v1's precomputed regression pairs for one generator update, [B, ...] each: a prompt's
    conditioning, an initial noise and the teacher's guided T-step sample (latents) from that noise
    with that prompt (`data.pairs`, written by `dpdmd_jax.sample --sampler=teacher --pairs`)."""

    cond: Cond
    noise: jax.Array
    target: jax.Array


@flax.struct.dataclass
class RoundBatch:
    """Inputs of one round: conditionings for the M critic updates and the generator update
    ([M + 1, B, ...], last = generator), the unconditional conditioning ([B, ...]) and, for the
    GAN's classifier with `gan.real="data"`, real latents [M + 1, B, H, W, C] aligned with `cond`
    (row i, sample b is an image of the prompt of cond[i, b]); None otherwise. `pairs`: the
    regression's cached pairs (`regression.pairs`), None for the online regression and without one."""

    cond: Cond
    uncond: Cond
    real: Any = None
    pairs: Pairs | None = None


@flax.struct.dataclass
class Perceptual:
    """The image-space distance of DMD v1's regression (regression.distance="lpips"): the pipeline's
    VAE, which decodes latents to images, and LPIPS on them (`models.vgg.LPIPS`); frozen. Each
    `*_graphdef` merges with its parameters."""

    vae_graphdef: Any = flax.struct.field(pytree_node=False)
    vae: Params
    lpips_graphdef: Any = flax.struct.field(pytree_node=False)
    lpips: Params


@flax.struct.dataclass
class Frozen:
    """What no update touches: teacher parameters and the non-trainable buffers all models share;
    with an LPIPS regression also the VAE and LPIPS it measures with (None, no pytree node, else)."""

    teacher: Params
    buffers: Params
    perceptual: Perceptual | None = None


@flax.struct.dataclass
class Adapted:
    """A network that is a frozen base plus trained low-rank adapters (`distill.adapters`): what
    the student or fake score is with LoRA. `graphdef` merges with (adapters, base, buffers)."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    base: Params
    adapters: Params


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The trained state of a run (a pytree; `replace` as a flax struct). The GAN's classifier head on
    the fake score's features (`models.gan_head`) and its optimizer state are None without the GAN
    (gan.weight = 0), and a None field is no node of the pytree: such a state has exactly the tree,
    and its checkpoints exactly the layout, of a state from before the GAN existed (those restore)."""

    step: jax.Array  # completed rounds (generator updates)
    rng: jax.Array
    student: Params  # its trained parameters: the whole network, or its adapters with LoRA
    fake: Params
    opt_student: Any  # optax.ApplyIfFiniteState: counts the skipped (non-finite) updates
    opt_fake: Any
    disc: Params | None = None
    opt_disc: Any = None

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    @property
    def nonfinite(self) -> jax.Array:
        """Consecutive rounds whose generator update was skipped (non-finite gradients)."""
        return self.opt_student.notfinite_count

    @property
    def skipped(self) -> jax.Array:
        """Total skipped updates (generator + critic, and the GAN head's)."""
        total = self.opt_student.total_notfinite + self.opt_fake.total_notfinite
        return total if self.opt_disc is None else total + self.opt_disc.total_notfinite


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))
_OPTIONAL_FIELDS = ("disc", "opt_disc")


def _flatten_state(state: TrainState):
    names = tuple(n for n in _STATE_FIELDS if n not in _OPTIONAL_FIELDS or getattr(state, n) is not None)
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], names


jax.tree_util.register_pytree_with_keys(TrainState, _flatten_state,
                                        lambda names, children: TrainState(**dict(zip(names, children))))


# ---------------------------------------------------------------------------- interfaces


class Schedule(Protocol):
    """What `distill/` needs of a noise schedule. A *level* is the schedule's own noise coordinate
    (flow: sigma in [0, 1]; VP: the integer timestep), `clean` meaning no noise left; grids are
    host numpy arrays of levels ending at `clean` (`diffusion.schedules`)."""

    name: str
    prediction: str  # what the network predicts: "v" (flow) | "eps" (VP)
    clean: float  # the level of a clean sample
    targets: tuple[str, ...]  # diversity targets that fit this schedule ("line" needs a straight path)

    def model_time(self, level: ArrayLike) -> jax.Array:
        """The network's timestep input for `level` (SD3: 1000 * sigma; SDXL: t)."""

    def add_noise(self, x: ArrayLike, noise: ArrayLike, level: ArrayLike) -> jax.Array: ...

    def to_x0(self, z: ArrayLike, prediction: ArrayLike, level: ArrayLike) -> jax.Array: ...

    def teacher_step(self, z: ArrayLike, prediction: ArrayLike, level: ArrayLike, next_level: ArrayLike) -> jax.Array:
        """One deterministic ODE step (the anchor must come from the ODE, not an SDE sampler)."""

    def student_step(self, z: ArrayLike, prediction: ArrayLike, level: ArrayLike, next_level: ArrayLike,
                     key: jax.Array) -> jax.Array:
        """One step of the few-step student (flow: Euler; VP: x0, then re-noised with fresh noise)."""

    def critic_target(self, x: ArrayLike, noise: ArrayLike) -> jax.Array:
        """The fake score's regression target for x noised with `noise` (flow: noise - x; VP: noise)."""

    def teacher_grid(self, teacher: ml_collections.ConfigDict) -> np.ndarray: ...

    def student_grid(self, student: ml_collections.ConfigDict) -> np.ndarray: ...

    def training_levels(self, dmd: ml_collections.ConfigDict) -> np.ndarray:
        """The levels DMD and critic noise is drawn from, uniformly."""

    def problems(self, c: ml_collections.ConfigDict) -> list[str]:
        """Config values this schedule cannot use, one sentence each (for `run.preflight.config_problems`)."""


class Backbone(Protocol):
    """A model family (`dpdmd_jax.backbones`): its schedule, conditioning and weights."""

    schedule: Schedule
    cond_type: type

    def check_source(self) -> list[str]:
        """Cheap checks of `config.model.source` (paths exist, ...), one sentence per problem."""

    def load(self, mesh: jax.sharding.Mesh, rules) -> Any:
        """The frozen teacher (an nnx.Module) from `config.model.source`, each parameter on the
        sharding its logical axes get under `rules` (`parallel.mesh.state_shardings`)."""

    def apply(self, model: Any, z: jax.Array, level: jax.Array, cond: Any) -> jax.Array:
        """The prediction (v or eps, per `schedule.prediction`) at `level` ([B] schedule levels)."""

    def features(self, model: Any, z: jax.Array, level: jax.Array, cond: Any) -> jax.Array:
        """The network's intermediate features at `level` that the GAN's classifier head reads,
        [B, h, w, D] (DMD2: the UNet's mid block output; the MMDiT's image tokens after joint block
        `gan.block`, on the patch grid); the forward stops there. Optional: a backbone without it
        cannot train with the GAN (gan.weight > 0)."""

    def latent_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one latent."""

    def cond_spec(self, batch: int) -> Any:
        """`cond_type` of ShapeDtypeStructs for `batch` samples."""

    def has_vae(self) -> bool:
        """Whether samples are decoded by a VAE (`load_vae`, `decode`); else latents are images."""

    def abstract_teacher(self) -> Any:
        """What `load` returns, shapes only (`weights.loader.abstract_model`): no weights read; the
        planner (`run.plan`) compiles the run on it. Optional: a backbone without it cannot be planned."""

    def abstract_text_encoders(self) -> dict[str, Any]:
        """The text encoders a prompt source puts on device, shapes only (the planner counts them)."""


class NoPrompts(ValueError):
    """A data source that cannot turn prompts into conditionings (random, or cached embeddings)."""


class DataSource(Protocol):
    """Where conditionings come from (`dpdmd_jax.data`): each round's batch for the trainer, and the
    conditioning of given prompts for the sampler and the evaluators."""

    def round(self, r: int, rows: slice) -> RoundBatch:
        """Round r's host (numpy) batch restricted to the global batch rows `rows`: a pure function
        of (config.seed, r), so a resumed run replays the same data."""

    def encode(self, batch: RoundBatch) -> RoundBatch:
        """On device, once every process's rows form global arrays (the text sources encode their
        token ids here; host sources return `batch` as it is)."""

    def prompts(self) -> Sequence[str]:
        """The prompts this source samples from (raises `NoPrompts` if it has none)."""

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The conditioning of `prompts` ([len(prompts), ...]; raises `NoPrompts` if it cannot)."""

    def uncond(self, n: int) -> Cond:
        """The unconditional conditioning, [n, ...]."""

    def prompt_problems(self, prompts: Sequence[str]) -> list[str]:
        """Why some of `prompts` cannot be encoded (the toy knows only its class names), or []."""

    def eval_cond(self, n: int) -> Cond:
        """The conditionings of the source's first n prompts (fixed sample grids)."""


class Evaluator(Protocol):
    """What the loop runs every `every` rounds, or once after training (`dpdmd_jax.eval`)."""

    def run(self, step: int, state: TrainState, writer: Any) -> dict | None: ...

