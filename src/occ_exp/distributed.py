"""torch.distributed set-up for the learner: torchrun / Slurm initialisation, FSDP2 sharding, and
the few collectives the RL loop needs.

    torchrun --nproc_per_node=8 -m occ_exp.train model=mimo7b ...      # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-endpoint=$HEAD:29500 -m occ_exp.train ...
    python -m occ_exp.train -m hydra/launcher=slurm ...               # submitit: one task per GPU

Without WORLD_SIZE in the environment (and outside a multi-task Slurm job) `init_distributed`
returns a `Dist` with world_size 1 and no process group, and every helper below is the identity:
a single-process run is exactly what it was before this module existed.

With a process group, the data flow of one RL step is

    prompts of the step (same on every rank) -> this rank's contiguous share (whole groups)
      -> rollout, reward, group-normalised advantages, logp_old      (local: groups never split)
      -> `gather_rollouts`: every rank holds the global batch (token ids and per-token floats)
      -> each global mini-batch (the same shuffle on every rank) is cut into `world_size` equal
         row slices; each rank runs forward/backward on its slice in micro-batches
      -> losses are local sums over the GLOBAL token (or sequence) count, and FSDP2 reduces
         gradients with a SUM, so the gradient equals the one-process gradient of the same batch
      -> the OCC coefficient is estimated on the gathered per-token log-probs of the whole
         mini-batch (see occ_exp.learner), so lambda_t is identical on every rank and to one process.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer, every MTP layer and the
root (embeddings, final norm, LM head) over a 1-D device mesh. On GPUs parameters are kept in
float32 (the optimiser's master copy) and all-gathered in bfloat16 for compute; gradients are
reduce-scattered in float32 (`MixedPrecisionPolicy`). On the CPU (gloo) everything is float32.

Checkpoints under FSDP2: the model folder is gathered onto rank 0 one tensor at a time in the
folder's dtype (`full_model_state_dict`); the optimiser state, float32 master weights and every
rank's RNGs stay sharded: each rank writes its own shards with torch.distributed.checkpoint
(`save_sharded_state`), and `load_sharded_state` reshards them onto any number of ranks, or one
process.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from submitit.helpers import TorchDistributedEnvironment
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from occ_exp.runtime import pick_device, rng_state


@dataclass
class Dist:
    """This process's place in the job. `enabled` is True when a process group exists (then the
    learner is sharded with FSDP2, even with world_size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False
    mesh: object = None
    owns_group: bool = False  # init_distributed created the process group (close() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi_rank(self) -> bool:
        """A process group with several ranks: collectives communicate, FSDP2 shards across ranks."""
        return self.enabled and self.world_size > 1

    # -- collectives (the identity without a process group) -----------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of a tensor (sum or max); returns it."""
        if self.multi_rank:
            comm = t.to(self.device) if t.device != self.device else t
            tdist.all_reduce(comm, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
            if comm is not t:
                t.copy_(comm)
        return t

    def sum(self, x) -> float:
        return float(self.all_reduce(torch.tensor(float(x), dtype=torch.float64, device=self.device)))

    def max(self, x: int) -> int:
        return int(self.all_reduce(torch.tensor(int(x), dtype=torch.int64, device=self.device), "max"))

    def barrier(self) -> None:
        if self.multi_rank:
            tdist.barrier()

    def mean_dict(self, d: dict) -> dict:
        """Per-rank scalar metrics -> their mean over ranks (keys ending in `_max`: the maximum)."""
        if not self.multi_rank or not d:
            return d
        keys = sorted(d)
        means = self.all_reduce(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=self.device))
        maxes = self.all_reduce(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=self.device), "max")
        return {k: float(maxes[i]) if k.endswith("_max") else float(means[i]) / self.world_size
                for i, k in enumerate(keys)}

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (the identity without a process group)."""
        if not self.multi_rank:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.multi_rank:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. a warm start that fills a cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # -- data split -----------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's contiguous share of a list whose length is divisible by world_size."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} items do not split evenly over {self.world_size} ranks")
        k = n // self.world_size
        return items[self.rank * k : (self.rank + 1) * k]

    def share_of(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global mini-batch's row indices (equal slices)."""
        return torch.tensor_split(idx, self.world_size)[self.rank] if self.world_size > 1 else idx

    def gather_rollouts(self, batch, prompts_per_rank: int):
        """Every rank's rollout batch, concatenated in rank order (rank r's prompts are the r-th
        share of the step's prompts, so the result is laid out as one process would lay it out).
        Prompt widths are re-padded on the left and response widths on the right; the engine's
        `stats` are merged by the batch's own `merge_stats`. `batch` is an
        occ_exp.rollout.base.RolloutBatch (duck-typed: plumbing imports no noun)."""
        if not self.multi_rank:
            return batch
        P = self.max(batch.prompt_len)
        R = self.max(batch.response_len)
        b = pad_batch(batch, P, R)
        b.prompt_index = b.prompt_index + self.rank * prompts_per_rank
        rows = {}
        for name in b._ROWS:
            v = getattr(b, name)
            if v is None:
                rows[name] = None
                continue
            send = v.to(self.device)
            send = send.to(torch.uint8) if send.dtype == torch.bool else send
            parts = [torch.empty_like(send) for _ in range(self.world_size)]
            tdist.all_gather(parts, send.contiguous())
            rows[name] = torch.cat(parts).to(v.device, v.dtype)
        texts = [t for part in self.all_gather_object(b.texts) for t in part]
        stats = b.merge_stats(self.all_gather_object(batch.stats))  # the engine's counters, all ranks'
        return b._replace(texts=texts, stats=stats, **rows)

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


def pad_batch(batch, P: int, R: int):
    """The same rows with the prompt left-padded to width P and the response right-padded to R."""
    dp, dr = P - batch.prompt_len, R - batch.response_len
    if dp == 0 and dr == 0:
        return batch._replace()
    if dp < 0 or dr < 0:
        raise ValueError(f"cannot pad a batch of widths ({batch.prompt_len}, {batch.response_len}) to ({P}, {R})")
    pad = torch.nn.functional.pad
    pad_id = int(batch.input_ids[~batch.attention_mask.bool()][0]) if (~batch.attention_mask.bool()).any() else 0
    kw = {"input_ids": pad(batch.input_ids, (dp, dr), value=pad_id),
          "attention_mask": pad(batch.attention_mask, (dp, dr), value=0), "prompt_len": P}
    for n in ("response_mask", "logp_sampler", "logp_old"):
        v = getattr(batch, n)
        kw[n] = pad(v, (0, dr), value=False if v.dtype == torch.bool else 0) if v is not None else None
    return batch._replace(**kw)


# -- initialisation ---------------------------------------------------------------------------------
def _export_slurm_env() -> None:
    """Under hydra-submitit-launcher (one task per GPU), turn Slurm's variables into torchrun's."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(dist_cfg, device_name: str = "auto") -> Dist:
    """Join the process group that torchrun (or Slurm through submitit) describes in the
    environment; without one, a single process with no process group."""
    _export_slurm_env()
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=dist_cfg.timeout_min),
                                 device_id=device if use_cuda else None)
    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, local_rank, device, True, mesh, owns)


def world_size_from_env() -> int | None:
    """The world size torchrun or a submitit Slurm job announces (None outside both)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


# -- the sharded model ------------------------------------------------------------------------------
def compute_dtype(dist_cfg, device: torch.device) -> torch.dtype:
    """The dtype FSDP2 all-gathers parameters in for compute (master weights stay float32)."""
    mp = dist_cfg.mixed_precision
    if mp == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[mp]


def apply_activation_checkpointing(policy, enabled: bool) -> None:
    """Recompute each decoder block (trunk and MTP layers) in backward instead of storing its
    activations: transformers' own gradient checkpointing, non-reentrant (composes with FSDP2)."""
    if enabled:
        policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_policy(policy, dist: Dist, dist_cfg):
    """FSDP2: each decoder layer, each MTP layer and the root become one FSDP unit each.

    Gradients are reduced with a SUM (divide factor 1): every rank's loss is already its share of
    the global sum divided by the global token count."""
    if not dist.enabled:
        return policy
    param_dtype = compute_dtype(dist_cfg, dist.device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=None)
    kw = dict(mesh=dist.mesh, mp_policy=mp, reshard_after_forward=dist_cfg.reshard_after_forward)
    units = list(policy.lm.model.layers) + list(policy.mtp_layers)
    in_units = {id(p) for u in units for p in u.parameters()}
    with torch.no_grad():  # fp32 master weights: the root's own parameters first ...
        for p in policy.parameters():
            if id(p) not in in_units and p.dtype != torch.float32:
                p.data = p.data.float()
    for unit in units:  # ... then one block at a time, which then moves to the device and shards
        unit.to(torch.float32)
        fully_shard(unit, **kw)
        unit._occ_reshard_after_forward = dist_cfg.reshard_after_forward
    fully_shard(policy, **kw)
    for m in _fsdp_modules(policy):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    # FSDP2 finds its root on the first forward through it; run one so that calls into inner
    # modules (generate on policy.lm) see an initialised root.
    with torch.no_grad():
        ids = torch.ones(1, policy.num_mtp_layers + 2, dtype=torch.long, device=dist.device)
        policy(ids, torch.ones_like(ids), 1, with_mtp=False)
    return policy


def _fsdp_modules(policy) -> list:
    return [m for m in policy.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]


@contextlib.contextmanager
def full_params(policy, dist: Dist):
    """The whole model on every rank for the duration of the block (rollout=hf's generate).

    One all-gather of every FSDP unit up front (a full copy of the weights in the compute dtype
    per rank: 2 bytes x parameters), none while decoding; ranks then generate independently, so
    different response lengths on different ranks cannot deadlock. Resharded on exit."""
    if not dist.enabled:
        yield
        return
    mods = _fsdp_modules(policy)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # the root keeps its parameters after forward (FSDP2's own choice for the root)
            m.set_reshard_after_forward(getattr(m, "_occ_reshard_after_forward", False), recurse=False)


# -- gradients --------------------------------------------------------------------------------------
def global_norm(tensors, dist: Dist) -> torch.Tensor:
    """The global L2 norm of `tensors` (an iterable; FSDP2 DTensor shards are disjoint: sum the
    local squares, all-reduce), float32."""
    sq = torch.zeros((), dtype=torch.float64, device=dist.device)
    sharded = False
    for t in tensors:
        if hasattr(t, "to_local"):
            t, sharded = t.to_local(), True
        sq += t.detach().double().pow(2).sum().to(dist.device)
    if dist.enabled and sharded:
        dist.all_reduce(sq)
    return sq.sqrt().float()


def grad_norm(params, dist: Dist) -> torch.Tensor:
    """The global L2 norm of the gradients."""
    return global_norm((p.grad for p in params if p.grad is not None), dist)


def clip_grads(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients so that their global norm is at most max_norm (0 or inf = off)."""
    if max_norm <= 0 or not torch.isfinite(total_norm):
        return
    coef = float(max_norm) / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


# -- state dicts ------------------------------------------------------------------------------------
def full_model_state_dict(policy, dist: Dist, dtype: torch.dtype | None = None) -> dict | None:
    """The full (unsharded) state dict of `policy.lm`, on CPU, on rank 0 (None on other ranks),
    its floating tensors cast to `dtype` if given. A collective: every rank must call it. Without
    a process group: None (save as before).

    Gathered one tensor at a time: every rank briefly holds one full tensor (in the parameter
    dtype, on its device), rank 0 keeps it on the CPU in `dtype`, so rank 0's host memory grows
    by the model's size in `dtype` (2 bytes x parameters for a bf16 folder), never by its
    float32 size nor by the optimiser's."""
    if not dist.enabled:
        return None
    out = {}
    for k, v in get_model_state_dict(policy).items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if dist.is_main:
            full = full.detach()
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            out[k.removeprefix("lm.")] = full.cpu()
        del full
    return out if dist.is_main else None


def load_full_model_state_dict(policy, lm_state: dict | None, dist: Dist) -> None:
    """Load a full `policy.lm` state dict (read on rank 0 only) into the sharded policy."""
    sd = {f"lm.{k}": v for k, v in (lm_state or {}).items()}
    set_model_state_dict(policy, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def optimizer_state_dict(policy, optimizer, dist: Dist) -> dict | None:
    """What a checkpoint stores as "optimizer": `optimizer.state_dict()` in one process (the format
    is unchanged); under FSDP2 the full state keyed by parameter name, on CPU, on rank 0
    (a collective; marked by `FQN_OPTIMIZER`)."""
    if not dist.enabled:
        return optimizer.state_dict()
    sd = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {FQN_OPTIMIZER: True, **sd} if dist.is_main else None


FQN_OPTIMIZER = "occ_fqn_full_state"


def load_optimizer_state_dict(policy, optimizer, state: dict | None, dist: Dist) -> None:
    """Inverse of `optimizer_state_dict`: either format, into a sharded or a plain optimiser."""
    fqn = dist.all_gather_object(bool(state and state.get(FQN_OPTIMIZER)))[0]
    if not fqn:
        if dist.enabled:
            raise ValueError("this checkpoint's optimizer state was written by a single-process run; resume it in "
                             "one process, or start the sharded run from its model folder (model.path=...)")
        optimizer.load_state_dict(state)
        return
    sd = {k: v for k, v in (state or {}).items() if k != FQN_OPTIMIZER}
    set_optimizer_state_dict(policy, optimizer, sd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.enabled))


# -- the sharded trainer state (torch.distributed.checkpoint) -------------------------------------------
def save_sharded_state(folder: Path, policy, optimizer, dist: Dist, keep_weight=lambda t: False) -> None:
    """Write the optimiser state, the weights `keep_weight(tensor)` selects (e.g. float32 master
    weights of a model folder saved in bf16) and every rank's RNG state into `folder` with
    `torch.distributed.checkpoint` (collective): each rank writes its own shards
    (`__<rank>_0.distcp`; `.metadata` names them), nothing is gathered. Read back, into any
    number of ranks or one process, by `load_sharded_state`."""
    weights = {k: v for k, v in get_model_state_dict(policy).items() if keep_weight(v)}
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    state = {"model": weights, "optim": get_optimizer_state_dict(policy, optimizer), "rng": {f"rank{dist.rank}": buf}}
    dcp.save(state, checkpoint_id=folder, no_dist=not dist.enabled)
    dist.barrier()


def load_sharded_state(folder: Path, policy, optimizer, dist: Dist) -> dict | None:
    """Inverse of `save_sharded_state`, resharded to this run's ranks (or one process): the kept
    weights and the optimiser state are loaded in place; returns this rank's saved RNG state
    (None for a rank the writing run did not have)."""
    saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    weights = {k: v for k, v in get_model_state_dict(policy).items() if f"model.{k}" in saved}
    state = {"model": weights, "optim": get_optimizer_state_dict(policy, optimizer)}
    mine = f"rank{dist.rank}"
    if f"rng.{mine}" in saved:
        state["rng"] = {mine: io.BytesIO()}
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.enabled)
    except dcp.api.CheckpointException as e:  # a BaseException: make it an ordinary error
        raise ValueError(str(e)) from None
    if weights:
        set_model_state_dict(policy, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    if "rng" not in state:
        return None
    buf = state["rng"][mine]
    buf.seek(0)
    return torch.load(buf, weights_only=False)
