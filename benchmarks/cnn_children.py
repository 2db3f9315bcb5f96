"""The two child processes bench_vision.py and bench_speech.py run per method: edgepeft training an int8 CNN bundle
with numpy + onnxruntime, and torch + PEFT replaying the same batches from the same start on the fp32 model.

Each bench supplies a preamble that defines ``bundle``, ``args`` (its JSON argument), ``train`` and ``test`` (data
sets read by the device's own readers, so both sides see the same inputs); the torch child's preamble also builds
``model`` (the fp32 module, its head the bundle's). What both children time, the same way on each side: training
steps only, each step from its batch's preparation to the updated delta. Not timed: edgepeft's session building
and memory probes, torch's model loading and one warm-up pass (oneDNN builds its kernels there, as onnxruntime does
while its sessions are built), and every evaluation. A step is one optimizer step: when edgepeft's memory plan
splits a batch into micro-batches, the torch child replays the whole batch as one step.

Both also record CPU seconds (time.process_time: every thread of the process) beside wall seconds per step: on a
machine shared with other jobs the wall clock measures the queue, the CPU seconds the work. Both run ``threads``
intra-op threads (0: torch's default, which is the cores' count, given to onnxruntime too).

args: steps, batch, lr, every (evaluate every N steps), threads (0: the default), data_parallel (edgepeft's
--data-parallel, default 0: its own choice), budget (edgepeft's --memory-budget MB, 0: none), start (where edgepeft writes its fresh delta), order (where it writes the batches).

The score is test accuracy unless the preamble defines ``measure(logits) -> dict`` over the whole test set's logits
(in test order): then its "score" entry is the curve's number (higher is better) and the whole dict is reported as
"before_metrics" and "metrics" (bench_pitch.py's pitch error). Both sides compute test logits in batches of the
training batch's size, with the same ``measure``, outside the timed steps.
"""

from __future__ import annotations

MEASURE = """
if "measure" not in globals():
    measure = lambda logits: {"score": float((logits.argmax(-1) == test.labels).mean())}
"""

EDGEPEFT = MEASURE + """
import os
from edgepeft.delta import Delta, delta_from_init, save_delta
from edgepeft.runtime.bundle import SessionConfig
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import TrainConfig, Trainer
threads = args["threads"] or os.cpu_count()  # torch's default on this machine, given explicitly to both sides
used = []  # each step's examples, for the torch child to replay (one batch however the memory plan splits it)
start = delta_from_init(bundle.manifest, 0)
save_delta(args["start"], start)
predictor, before, before_metrics = None, None, None
def metrics(deltas):
    step = args["batch"]
    return measure(np.concatenate([predictor.batch_logits(test.batch(np.arange(i, min(i + step, len(test)))), deltas)
                                   for i in range(0, len(test), step)]))
score = lambda deltas: metrics(deltas)["score"]
curve, step_times, step_cpu, t_train, cpu_train = [], [], [], 0.0, 0.0
cfg = TrainConfig(epochs=1000, max_steps=args["steps"], batch_size=args["batch"], lr=args["lr"], weight_decay=0.0,
                  eval_every=0, checkpoint_every=0, seed=0, memory_budget_mb=args["budget"], threads=threads,
                  data_parallel=args.get("data_parallel", 0))
last = [time.perf_counter(), time.process_time()]
def progress(p):
    global t_train, cpu_train
    now, cpu = time.perf_counter(), time.process_time()
    if p.metrics is None and p.step > 0:
        step_times.append(now - last[0]); t_train += now - last[0]
        step_cpu.append(cpu - last[1]); cpu_train += cpu - last[1]
    last[:] = time.perf_counter(), time.process_time()
class Probe(Trainer):  # evaluate on the test set every `every` steps, outside the timed steps
    def _sessions(self):  # building the sessions and probing the memory plan is setup, not training
        global predictor, before, before_metrics
        super()._sessions()
        # the test evaluations run as the trainer's own would: in the plan's arena (shared and capped under a budget)
        predictor = Predictor(bundle, self.plan.session if args["budget"] else SessionConfig(threads=threads))
        before_metrics = metrics([start])
        before = before_metrics["score"]
        last[:] = time.perf_counter(), time.process_time()
    def _step(self, group, lr):
        used.append([int(i) for index in group for i in index])
        loss = super()._step(group, lr)
        if (self.step + 1) % args["every"] == 0:
            t0, c0 = time.perf_counter(), time.process_time()
            curve.append([self.step + 1, t_train + (t0 - last[0]), score([Delta(self.params, self.delta.meta)])])
            last[0] += time.perf_counter() - t0  # the evaluation is not training time
            last[1] += time.process_time() - c0
        return loss
res = Probe(bundle, train, cfg, on_progress=progress).fit()
json.dump(used, open(args["order"], "w"))
after = metrics([res.delta])
print("RESULT", json.dumps({"before": before, "test_accuracy": after["score"], "curve": curve, "threads": threads,
                            "before_metrics": before_metrics, "metrics": after,
                            "step_s": float(np.median(step_times)), "train_s": t_train, "steps": res.summary.steps,
                            "cpu_step_s": float(np.median(step_cpu)), "cpu_train_s": cpu_train,
                            "memory_plan": res.summary.memory.describe() if args["budget"] else "no budget"}))
"""

TORCH = MEASURE + """
import torch
from torch import nn
from edgepeft.delta import load_delta
from edgepeft.names import BIAS, BN_SCALE, CNN_INPUTS, LABELS, LORA_A, LORA_B, WEIGHT, split_slot_name
m = bundle.manifest
INPUT = CNN_INPUTS[m.task]
for p in model.parameters():
    p.requires_grad_(False)
start = load_delta(args["start"], m, for_training=True)
lora = sorted({s.module for s in m.slots if s.kind == LORA_A})
net = model
if lora:
    from peft import LoraConfig, get_peft_model
    a0 = next(s for s in m.slots if s.kind == LORA_A)
    head = next(s.module for s in m.slots if s.kind == WEIGHT) if any(s.kind == WEIGHT for s in m.slots) else args["head"]
    model = get_peft_model(model, LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=lora, modules_to_save=[head]))
    net = model.base_model.model
model.eval()
params = []
with torch.no_grad():
    for s in m.slots:
        mod, kind = split_slot_name(s.name)
        layer = net.get_submodule(mod)
        t = torch.from_numpy(np.array(start.tensors[s.name]))
        if kind in (LORA_A, LORA_B):
            p = (layer.lora_A if kind == LORA_A else layer.lora_B)["default"].weight
            p.copy_(t.reshape(p.shape))
        else:
            base = layer.modules_to_save["default"] if hasattr(layer, "modules_to_save") else layer
            p = {BN_SCALE: base.weight, BIAS: base.bias, WEIGHT: base.weight}[kind]
            p += t
        p.requires_grad_(True)
        params.append(p)
opt = torch.optim.AdamW(params, lr=args["lr"], weight_decay=0.0)
order = json.load(open(args["order"]))
total = len(order)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / total))
def metrics():  # in batches of the training batch's size, as the edgepeft child evaluates
    with torch.no_grad():
        step = args["batch"]
        return measure(np.concatenate([model(torch.from_numpy(test.batch(np.arange(i, min(i + step, len(test))))[INPUT])).numpy()
                                       for i in range(0, len(test), step)]))
accuracy = lambda: metrics()["score"]
before_metrics = metrics()
before = before_metrics["score"]
b = train.batch(np.array(order[0]))  # one untimed warm-up pass (oneDNN builds its kernels), as edgepeft's session
nn.functional.cross_entropy(model(torch.from_numpy(b[INPUT])), torch.from_numpy(b[LABELS])).backward()
opt.zero_grad()  # building is untimed there; the gradients are dropped
curve, step_times, step_cpu, t_train, cpu_train = [], [], [], 0.0, 0.0
for k, index in enumerate(order):
    t0, c0 = time.perf_counter(), time.process_time()  # the batch's preparation counts, as on the device side
    b = train.batch(np.array(index))
    loss = nn.functional.cross_entropy(model(torch.from_numpy(b[INPUT])), torch.from_numpy(b[LABELS]))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    step_times.append(dt); t_train += dt; step_cpu.append(dc); cpu_train += dc
    if (k + 1) % args["every"] == 0:
        curve.append([k + 1, t_train, accuracy()])
after = metrics()
print("RESULT", json.dumps({"before": before, "test_accuracy": after["score"], "curve": curve, "threads": torch.get_num_threads(),
                            "before_metrics": before_metrics, "metrics": after,
                            "step_s": float(np.median(step_times)), "train_s": t_train, "steps": total,
                            "cpu_step_s": float(np.median(step_cpu)), "cpu_train_s": cpu_train}))
"""
