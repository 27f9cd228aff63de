"""Process group, DDP / FSDP2 / hybrid wrapping, gradient-sync control and full-state gathering.

Everything that differs between strategies lives here, on `Dist`: the loop, evaluation, checkpoints
and adapters ask it the same questions whatever the strategy (am I the main rank, skip gradient sync
for this micro-batch, sum this tensor over ranks, give me the full weights, does each rank save its
own shard, which module runs an eval forward), so no other module tests `strategy`.

`world` and `rank` count processes (the main rank, gathering objects, one file per rank);
`dp_world` and `dp_rank` the data-parallel axis (which examples a rank sees, the global batch, the
loss normalisation). Every strategy here is purely data-parallel, so the two agree today; a tensor-
or sequence-parallel axis would make `dp_world` a divisor of `world`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from engine.config import DistributedConfig
from engine.errors import DistributedSetupError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Dist:
    strategy: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    cfg: DistributedConfig | None = None
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    # ---- the data-parallel axis -----------------------------------------------------------
    @property
    def dp_world(self) -> int:
        """How many ranks see different examples (DDP, FSDP and hybrid FSDP: all of them)."""
        return self.world

    @property
    def dp_rank(self) -> int:
        return self.rank

    # ---- what the strategy changes for the rest of the engine ----------------------------
    @property
    def shards_state(self) -> bool:
        """Each rank holds only its shard of the weights and optimizer state (FSDP): each saves its own."""
        return self.strategy == "fsdp"

    @staticmethod
    def local_tensor(t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a sharded (DTensor) value; a plain tensor as it is."""
        return t.to_local() if hasattr(t, "to_local") else t

    @staticmethod
    def full_tensor(t: torch.Tensor) -> torch.Tensor:
        """The whole of a sharded (DTensor) value, e.g. the norm of sharded gradients; a plain tensor as it is."""
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def eval_module(self, model: nn.Module) -> nn.Module:
        """What an eval forward calls: DDP's wrapper adds nothing there; FSDP's forward gathers the
        shards, so it must be called."""
        return self.unwrap(model) if self.strategy == "ddp" else model

    def no_autograd(self):
        """inference_mode: no graph, no version counters; FSDP2's forward breaks under it (its
        all-gathered parameters become inference tensors it later writes to), so no_grad there."""
        return torch.no_grad() if self.strategy == "fsdp" else torch.inference_mode()

    def forward_casts_weights(self, precision_dtype: torch.dtype | None) -> bool:
        """Forward runs on low-precision copies of the weights (FSDP's mixed precision), so scores
        taken while training are not those of the fp32 weights that are saved."""
        return self.strategy == "fsdp" and precision_dtype is not None

    def packed_weight_dtype(self, compute_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype to store packed (4-bit) weights in, None for the library's default. FSDP shards
        and casts floating-point parameters only: stored in the dtype FSDP computes in, sharding and
        its mixed-precision cast leave the bits intact."""
        return compute_dtype if self.strategy == "fsdp" else None

    # ---- collectives (no-ops on one process) --------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        if not (self.active and self.world > 1):
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not (self.active and self.world > 1):
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active and self.world > 1:
            tdist.barrier()

    # ---- wrapping ------------------------------------------------------------------------
    def wrap(self, model: nn.Module, precision_dtype: torch.dtype | None) -> nn.Module:
        """Wrap for the strategy. Build the optimizer after this: FSDP replaces the parameters."""
        model.to(self.device)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters=False: frozen parameters (LoRA's body) have requires_grad=False
            # and DDP does not wait for them; every trainable one gets a gradient each step
            return DDP(model, device_ids=ids, find_unused_parameters=False)
        if self.strategy == "fsdp":
            return self._fully_shard(model, precision_dtype)
        return model

    def _fully_shard(self, model: nn.Module, precision_dtype):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": self.mesh, "reshard_after_forward": self.cfg.reshard_after_forward}
        if precision_dtype is not None:
            # compute in low precision, reduce gradients in fp32 so small updates are not lost
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision_dtype, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def shard_snapshot(self, load, build) -> nn.Module:
        """The model `load()` returns (a saved snapshot), sharded as training shards it but in its
        own dtype (fp32: scored as saved, no mixed-precision policy). Only rank 0 loads the weights;
        the others `build(config)` the model on the meta device and receive their shards from rank 0,
        so no rank but the first ever holds a whole copy. All ranks call."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model = load() if self.is_main else None
        config = self.broadcast_object(model.config if self.is_main else None)
        if not self.is_main:
            with torch.device("meta"):
                model = build(config)
        full = model.state_dict() if self.is_main else {}
        self._fully_shard(model, None)
        if not self.is_main:
            model.to_empty(device=self.shard_device)
        # set_model_state_dict wants one device for every value it loads (persistent buffers too):
        # rank 0's buffers, which fully_shard put on the device, wait beside the shards meanwhile
        move_buffers(model, self.shard_device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        # buffers are not sharded, and state_dict() lacks the non-persistent ones: rank 0 broadcasts
        # them. Every rank's copy goes where training keeps it (wrap() moves the model to the device,
        # whatever cpu_offload offloads), so all ranks broadcast from one device: under cpu_offload a
        # CPU buffer on one rank against a CUDA one on another fails, and NCCL takes CUDA tensors only
        move_buffers(model, self.device)
        with torch.no_grad():
            for buffer in model.buffers():
                tdist.broadcast(buffer, src=0)
        return model

    @property
    def shard_device(self) -> torch.device:
        """Where this rank's parameter shards live: host memory under FSDP's cpu_offload, else the device."""
        return torch.device("cpu") if self.cfg.cpu_offload else self.device

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain model under torch.compile's wrapper and DDP's, whose state_dict keys carry
        their prefixes (`_orig_mod.`, `module.`): saved so, a snapshot reloads as random weights."""
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
        if self.strategy == "ddp" and not sync:
            with model.no_sync():
                yield
        elif self.strategy == "fsdp":
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    def full_state_dict(self, model: nn.Module) -> dict:
        """Unsharded fp32 weights on CPU: the full dict on rank 0, {} elsewhere. All ranks call."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(model, options=opts)
        if not self.is_main:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.unwrap(model).state_dict().items()}

    def close(self) -> None:
        if self.active:
            tdist.destroy_process_group()


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Every buffer of `model` onto `device`, as Module.to moves them; the parameters stay where they are."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one, found without a per-architecture list.

    First the classes the model itself declares unsplittable (`_no_split_modules`, set by
    transformers for most architectures); else the most numerous same-type modules under one
    ModuleList (DistilBERT's `transformer.layer`), looking through lists of lists (Funnel's
    `encoder.blocks`: one list of layers per block). Only modules with a forward of their own can be
    units: fully_shard refuses a bare container.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model and _runs_forward(m)]
    if blocks:
        return blocks
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            units = list(_units(m))
            if len(units) > len(best) and len({type(u) for u in units}) == 1:
                best = units
    return best


def _runs_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward


def _units(container: nn.Module):
    """The modules under a container that run a forward, looking inside nested containers."""
    for child in container.children():
        if _runs_forward(child):
            yield child
        else:
            yield from _units(child)


def _available_backends() -> list[str]:
    return [b for b in tdist.Backend.backend_list if b not in ("undefined", "fake") and tdist.is_backend_available(b)]


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """torchrun's store, with a key prefix per restart attempt.

    After an elastic restart torchrun hands the new workers the same store, which still holds the
    dead attempt's gloo addresses; without a fresh prefix the new ranks dial those and fail.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                           is_master=not agent_hosts_it and rank == 0, timeout=timeout)
    return tdist.PrefixStore(f"engine/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(cfg: DistributedConfig, num_threads: int | None = None) -> Dist:
    """Join torchrun's process group (or a one-process group when a strategy runs without it)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.strategy == "none" and env_world > 1:
        raise DistributedSetupError(
            f"torchrun started {env_world} processes but distributed.strategy=none; "
            f"set distributed.strategy=ddp or fsdp")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # torchrun pins OMP_NUM_THREADS=1; we decide instead: share the cores among local ranks
        torch.set_num_threads(num_threads or max(1, usable_cores() // local_world))
    d = Dist(cfg.strategy, rank, env_world, local_rank, local_world, device, cfg)
    if cfg.strategy == "none":
        return d
    if cfg.replicas < 1 or env_world % cfg.replicas:
        raise DistributedSetupError(
            f"distributed.replicas={cfg.replicas} does not divide the {env_world} processes")
    backend = cfg.backend or ("nccl" if cuda else "gloo")
    for name in {part.rpartition(":")[2].strip().lower() for part in backend.split(",")}:
        if not tdist.is_backend_available(name):
            raise DistributedSetupError(f"distributed.backend={backend}: this torch build has no {name} "
                                        f"(on this machine: {', '.join(_available_backends()) or 'none'})")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if "WORLD_SIZE" in os.environ:
        tdist.init_process_group(backend, store=_attempt_store(rank, env_world, timeout), rank=rank,
                                 world_size=env_world, timeout=timeout, device_id=device if cuda else None)
    else:  # `python launch/train.py distributed.strategy=ddp`: a group of one, no torchrun needed
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if cfg.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        if cfg.replicas > 1:  # hybrid: shard inside each group, replicate across groups
            d.mesh = init_device_mesh(device.type, (cfg.replicas, env_world // cfg.replicas),
                                      mesh_dim_names=("replicate", "shard"))
        else:
            d.mesh = init_device_mesh(device.type, (env_world,), mesh_dim_names=("shard",))
    return d
