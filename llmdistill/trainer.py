"""DistillTrainer: a `transformers.Trainer` whose loss is (1 - α)·CE + α·KD against a frozen teacher."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from .config import CONFIG_FILENAME, DistillConfig, listed_teachers
from .config_checks import check_teacher_count
from .data import IGNORE_INDEX, DistillCollator
from .distributed import (
    average_gradients_over_ranks, gathered_for_reading, keep_whole_under_zero3, shard_keeping_head_whole,
    sum_over_ranks, zero3_teacher_engine,
)
from .errors import ConfigError, DataError, ModelError, NonFiniteLossError
from .losses import distill_loss_from_hidden
from .models import (
    LMHead, eval_mode, freeze, head_row_count, load_model, supervised_hidden_states, with_adapter,
)
from .objectives import CROSS_TOKENIZER, NEEDS_MINED_PAIRS, OBJECTIVES, ObjectiveOutput
from .objectives.cross_batch import CrossTokenizerBatch
from .objectives.dskd import DualSpaceProjectors
from .evaluation import exact_match, rouge_l
from .progress import TrainingProgress
from .projector_rates import projector_param_groups
from .rollout import Intervention, Sampling, divergence_statistics, rollout
from .sources import Generation, Produced, SequenceSource, StepSequences, left_padded_prompts
from .teacher_signal import TeacherSignal, load_teacher, open_teacher_cache
from .trainer_inputs import check_model_sources, load_tokenizers, tokenised_datasets
from .vocab import shared_vocab_size

PROJECTORS_FILENAME = "projectors.safetensors"
PROJECTORS_MODULE = "distill_projectors"  # the projectors' name inside the student, under DeepSpeed only
SOURCE_STATE_FILENAME = "sequence_source_rank{rank}.pt"
# Options that decide what a checkpoint holds (student weights, projectors, adapters, source state): a run resumes
# only from a checkpoint written with the same values.
RESUME_FIELDS = (
    "student_model_name_or_path", "objective", "source", "use_peft", "lora_r", "lora_target_modules", "dskd_s2t",
    "dskd_spaces",
)


class DistillTrainer(Trainer):
    """Trains `student` (alias `model`) towards `teacher`; both may be given as models or as names/paths.

    Datasets may be raw (prompt/response or messages columns, see `DistillConfig`) or already tokenised
    (`input_ids` and `labels`). With neither given, `args.dataset_name_or_path` is loaded.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | None = None,
        args: DistillConfig | None = None,
        teacher: PreTrainedModel | str | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        data_collator=None,
        student: PreTrainedModel | str | None = None,
        peft_config=None,
        **kwargs,
    ):
        if not isinstance(args, DistillConfig):
            raise TypeError("args must be a DistillConfig (it carries the distillation options).")
        student = _first_given(student, model, args.student_model_name_or_path, name="student")
        teacher = _first_given(teacher, args.teacher_model_name_or_path, name="teacher") if args.uses_teacher else None
        teachers = listed_teachers(teacher)
        check_teacher_count(args, len(teachers))
        check_model_sources(args, student, teachers)
        tokenizer, teacher_tokenizer, self.vocab_bridge = load_tokenizers(
            args, student, teachers, processing_class, teacher_processing_class
        )
        train_dataset, eval_dataset = tokenised_datasets(
            args, train_dataset, eval_dataset, tokenizer, teacher_tokenizer, teachers
        )
        super().__init__(
            model=_student_model(student, args, peft_config),
            args=args,
            data_collator=data_collator
            or DistillCollator(tokenizer.pad_token_id, teacher_pad_token_id=_pad_id(teacher_tokenizer)),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            **kwargs,
        )
        for shown_as_dicts in (ProgressCallback, PrinterCallback):
            self.remove_callback(shown_as_dicts)
        self.add_callback(TrainingProgress())
        # Our compute_loss divides by the step's token count itself: make the Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

        self._head_gradients, self._projector_gradients = None, None
        if self.is_fsdp_enabled:
            self._keep_head_whole_under_fsdp()
        self.teacher_signal, self.teacher, self.objective = None, None, None
        self._projectors_in_model, self._projector_groups = False, []
        if args.uses_teacher:
            self._set_up_teacher(teachers, tokenizer, teacher_tokenizer)
        self._set_up_source(tokenizer, teacher_tokenizer)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._evaluation_ce = self._no_evaluation_ce()
        self._tokens_since_log, self._last_log_time = 0, time.perf_counter()

    def _keep_head_whole_under_fsdp(self) -> None:
        """The loss reads the student's LM head weight outside the model's forward, where FSDP would hold only a
        shard of it: leave the head out of the shards and average its gradient over the ranks ourselves."""
        if not self.accelerator.is_fsdp2:
            raise ConfigError(
                "DistillTrainer supports FSDP version 2 (torch fully_shard): set fsdp_version: 2 in the accelerate "
                "config (see configs/accelerate/fsdp2.yaml)."
            )
        head = self.model.get_output_embeddings()
        self.accelerator.state.fsdp_plugin.ignored_modules = [head]
        self._head_gradients = _AverageGradients(list(head.parameters()))
        self.add_callback(self._head_gradients)

    def _set_up_teacher(self, teachers: list, tokenizer, teacher_tokenizer) -> None:
        """The teacher's signal (`self.teacher` is the model it exposes, see `TeacherSignal`) and the objective."""
        args = self.args
        self.teacher_signal = self._load_teacher_signal(teachers, teacher_tokenizer)
        self.teacher = self.teacher_signal.model
        if args.objective not in CROSS_TOKENIZER:  # raises if unsafe
            shared_vocab_size(tokenizer, self.teacher_signal.head_rows, head_row_count(self.model))
        heads = [self.model.get_output_embeddings().weight]
        if self.teacher is not None:
            heads.append(self.teacher.get_output_embeddings().weight)
        with gathered_for_reading(heads):  # ZeRO-3 may have sharded them at load; the objectives' set-up reads them
            self.objective = OBJECTIVES[args.objective](args, self.model, self.teacher, bridge=self.vocab_bridge)
        # DeepSpeed's engine and ZeRO optimizer take only the model's own parameters: there the projectors join the
        # student as a submodule (and are split off again when it is saved).
        self._projectors_in_model = self.projectors is not None and self.is_deepspeed_enabled
        if self._projectors_in_model:
            self.model.add_module(PROJECTORS_MODULE, self.projectors)
        # Read from the projectors' initial weights, before any step, so a resumed run gets the same rates.
        if self.projectors is not None:
            self._projector_groups = projector_param_groups(self.projectors, args.projector_learning_rate)
            if not self._projectors_in_model:  # neither DDP's gradient averaging nor DeepSpeed's reaches them
                self._projector_gradients = _AverageGradients(list(self.projectors.parameters()))
                self.add_callback(self._projector_gradients)
            head_trains = LMHead.of(self.model).weight.requires_grad
            self.add_callback(_ProjectorUpkeep(self.projectors, head_trains, self._projectors_in_model))

    def _load_teacher_signal(self, teachers: list, teacher_tokenizer) -> TeacherSignal:
        """From the teacher cache, or from the teachers, frozen on this device; one teacher is sharded as the student
        is under FSDP or ZeRO-3."""
        args = self.args
        if args.teacher_cache:
            splits = {"train": self.train_dataset}
            if self.eval_dataset is not None:
                splits["eval"] = self.eval_dataset
            cache = open_teacher_cache(
                args, teachers[0], teacher_tokenizer, splits, self.accelerator.main_process_first
            )
            return TeacherSignal.from_cache(cache, args.device)
        zero3 = self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
        if len(teachers) > 1 and (self.is_fsdp_enabled or zero3):
            raise ConfigError(
                "several teachers run whole on each rank: use DDP or ZeRO-2 (accelerate's ddp.yaml or "
                "zero2.yaml), not FSDP or ZeRO-3, or one teacher."
            )
        models = [freeze(load_teacher(teacher, args)).to(args.device) for teacher in teachers]
        if self.is_fsdp_enabled:
            shard_keeping_head_whole(models[0])
        elif zero3:  # kept with the trainer for the teacher's life: its hooks gather the teacher's layers
            self._teacher_engine = zero3_teacher_engine(models[0], self.accelerator.state.deepspeed_plugin)
        return TeacherSignal(models, args.temperature, cross_tokenizer=args.objective in CROSS_TOKENIZER)

    def _set_up_source(self, tokenizer, teacher_tokenizer) -> None:
        """The source of the KD sequences; a generating one samples with a generator seeded per rank."""
        args = self.args
        self.sequences = None
        if args.source == "gt":
            return
        if args.source == "adaptive" and (self.eval_dataset is None or args.eval_strategy == "no"):
            raise ConfigError(
                "source='adaptive' raises its share of student generations when the validation loss rises: give "
                "evaluation data (eval_dataset / eval_dataset_name_or_path) and set eval_strategy='steps' (eval_steps)."
            )
        source = SequenceSource(args.source, args.mixed_lambda, args.replay_buffer_size, args.seed)
        cross = self.objective.cross_tokenizer
        pairings = ("mined",) if args.objective in NEEDS_MINED_PAIRS else ()
        generation = Generation(args, tokenizer, teacher_tokenizer, cross_tokenizer=cross, pairings=pairings)
        generator = torch.Generator(device=args.device).manual_seed(args.seed + self.accelerator.process_index)
        self.sequences = StepSequences(source, generation, generator, self.teacher, self._prepare_inputs)
        if args.source == "adaptive":
            self.add_callback(_AdaptiveSchedule(source, self.evaluate))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The Trainer's micro-batches of one optimizer step; a generating source keeps them, so that the step's
        first `compute_loss` generates for all of them in one rollout (`StepSequences`)."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sequences is not None:
            self.sequences.keep(batches)
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """(1 - α)·CE + α·KD on one micro-batch: the source says which sequences KD runs on, the teacher signal
        gives the teacher's side of them, the objective compares the two, and the terms are recorded for `log`."""
        if self.is_deepspeed_enabled:
            self._keep_read_parameters_whole(model)
        gold_tokens = _supervised_count(inputs["labels"])
        denominator = num_items_in_batch if num_items_in_batch is not None else gold_tokens
        draw, produced = self._next_draw(model, inputs)
        alpha = self.args.alpha_kd if self.objective is not None else 0.0  # SFT: CE at full weight
        if draw == "gt":
            output = self._objective_output(model, inputs, (1 - alpha) / denominator, alpha / denominator)
            ce_tokens = kd_tokens = gold_tokens
        else:
            output, ce_tokens, kd_tokens = self._on_generated(model, inputs, produced, gold_tokens, denominator)
        loss = output.loss
        if not torch.isfinite(loss):
            self._raise_non_finite(inputs, output)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks; undo it
        self._record(output, ce_tokens, kd_tokens)
        return (loss, None) if return_outputs else loss

    def _keep_read_parameters_whole(self, model) -> None:
        """The loss reads the student's head (and the projectors in it) outside the forward: a no-op unless ZeRO-3
        has partitioned the student."""
        student = self.accelerator.unwrap_model(model)
        read_outside_forward = [*student.get_output_embeddings().parameters()]
        if self._projectors_in_model:
            read_outside_forward += self.projectors.parameters()
        keep_whole_under_zero3(student, read_outside_forward)

    def _next_draw(self, model, inputs) -> tuple[str, Produced | None]:
        """The source's draw for this micro-batch and the rows it produced (`StepSequences.next`), recorded for the
        logs; "gt" for evaluation and for source gt."""
        if self.sequences is None or not model.training:
            return "gt", None
        source = self.sequences.source
        draw, produced = self.sequences.next(
            self.accelerator.unwrap_model(model), inputs, self.state.global_step, self.state.max_steps
        )
        self._record_values({"generated_batches_fraction": float(draw != "gt")})
        if source.name == "adaptive":
            self._record_values({"student_generation_probability": source.student_probability})
        if draw == "generate":
            self._record_values({**produced.statistics,
                                 "generated_rows_fraction": len(produced.rows) / len(inputs["input_ids"])})
        return draw, produced

    def _objective_output(self, model, inputs, ce_weight, kd_weight, teacher_hidden=None, on_policy=False
                          ) -> ObjectiveOutput:
        """ce_weight · Σ CE + kd_weight · Σ KD against the teacher over the batch's supervised positions.
        `teacher_hidden` ([N, D] at those positions, e.g. from the rollout) replaces the teacher signal; `on_policy`:
        the batch's responses were generated during training."""
        input_ids, targets = inputs["input_ids"], inputs["labels"][:, 1:]
        supervised = targets != IGNORE_INDEX
        student_hidden = supervised_hidden_states(model, input_ids, inputs["attention_mask"], supervised)
        student_head = LMHead.of(self.accelerator.unwrap_model(model))
        labels = targets[supervised]
        if self.objective is None or kd_weight == 0:
            sums = distill_loss_from_hidden(
                student_hidden, student_head, labels=labels, ce_weight=ce_weight, chunk_size=self.args.loss_chunk_size
            )
            return ObjectiveOutput(sums.loss, sums.ce, sums.kd, {})
        weights = {"ce_weight": ce_weight, "kd_weight": kd_weight}
        if teacher_hidden is None:
            teacher_hidden = self.teacher_signal(inputs)
        teacher_head = self.teacher_signal.head
        if self.objective.cross_tokenizer:
            batch = CrossTokenizerBatch.of(inputs, student_hidden, student_head, teacher_hidden, teacher_head)
            return self.objective(batch, **weights)
        return self.objective(
            student_hidden, student_head, teacher_hidden, teacher_head, labels, **weights, on_policy=on_policy
        )

    def _on_generated(self, model, inputs, produced: Produced, gold_tokens: int, gold_denominator
                      ) -> tuple[ObjectiveOutput, int, int]:
        """CE on the gold batch, KD on the rows the source produced for it: responses generated to its prompts, or
        a batch replayed from the buffer (METHODS §4).

        The generated token count of a whole optimizer step is unknown until every micro-batch has generated, so KD
        is averaged per micro-batch and the micro-batches (and ranks) weigh equally.
        """
        alpha = self.args.alpha_kd
        rows, teacher_hidden = produced.rows, produced.teacher_hidden
        if not rows:  # nothing generated can be trained on (e.g. every cross-tokenizer response was empty)
            weights = ((1 - alpha) / gold_denominator, alpha / gold_denominator)
            return self._objective_output(model, inputs, *weights), gold_tokens, gold_tokens
        generated = self._prepare_inputs(self.data_collator(rows))
        kd_tokens = _supervised_count(generated["labels"])
        if produced.student_hidden is not None:  # the student wrote alone: score its responses in one teacher pass
            teacher_hidden = self.teacher_signal(generated)
            if self._logs_after_this_step():
                self._record_divergences(produced.student_hidden, teacher_hidden, generated["labels"])
        micro_batches = self.args.gradient_accumulation_steps * (
            self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        )
        kd = self._objective_output(
            model, generated, 0.0, alpha / (kd_tokens * micro_batches), teacher_hidden, on_policy=True
        )
        if alpha == 1:  # no CE term: skip the gold forward pass
            return kd, 0, kd_tokens
        ce = self._objective_output(model, inputs, (1 - alpha) / gold_denominator, 0.0)
        return ObjectiveOutput(ce.loss + kd.loss, ce.ce, kd.kd, kd.metrics), gold_tokens, kd_tokens

    def _logs_after_this_step(self) -> bool:
        steps = self.state.logging_steps
        return self.args.logging_strategy == "steps" and bool(steps) and (self.state.global_step + 1) % steps == 0

    def _record_divergences(self, student_hidden, teacher_hidden, labels) -> None:
        """`jsd_*` by response position for responses the student wrote alone, measured on logging steps only."""
        supervised = labels[:, 1:] != IGNORE_INDEX
        positions = (supervised.cumsum(1) - 1)[supervised]
        student_head = LMHead.of(self.accelerator.unwrap_model(self.model))
        self._record_values(divergence_statistics(
            student_hidden.to(teacher_hidden.dtype), student_head, teacher_hidden, self.teacher_signal.head, positions,
        ))

    def _raise_non_finite(self, inputs, output: ObjectiveOutput) -> None:
        """Names the model to fix: a teacher whose outputs (or head, or cached signal) hold NaN/inf, else the
        student's training, which diverged."""
        if self.teacher_signal is not None and not self.teacher_signal.finite(inputs):
            model = self.args.teacher_cache or self.args.teacher_model_name_or_path or "the teacher"
            raise ModelError(
                f"the teacher ({model}) produced non-finite values (NaN or inf) on a training batch: check its "
                "weights, or load it in float32 (model_dtype=float32) if they overflow in half precision."
            )
        raise NonFiniteLossError(
            f"the loss is not finite (ce sum {float(output.ce)}, kd sum {float(output.kd)}) while the teacher's "
            "outputs are: the student diverged. Lower learning_rate, or load the models in float32 (model_dtype=float32)."
        )

    def _record(self, output: ObjectiveOutput, ce_tokens: int, kd_tokens: int) -> None:
        """Keeps per-token terms as tensors; `log` reads them, so a step waits on no device-to-host copy here.
        CE is per gold token (not logged when no CE was computed; an evaluation's is summed for `evaluation_loop`),
        KD per token of the sequences it ran on."""
        if ce_tokens and self.model.training:
            self._record_values({"ce": output.ce.detach() / ce_tokens})
        elif ce_tokens:
            self._evaluation_ce += torch.stack([output.ce.detach(), output.ce.new_tensor(ce_tokens)]).double()
        if self.objective is not None:
            self._record_values({"kd": torch.as_tensor(output.kd).detach() / kd_tokens})
        self._record_values(output.metrics)
        if self.model.training:
            self._tokens_since_log += max(ce_tokens, kd_tokens)

    def _record_values(self, values: dict) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in values.items():
            metrics[name].append(torch.as_tensor(value).detach())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The loss terms, plus ROUGE-L and exact match of greedy responses to the first `eval_generation_size`
        evaluation prompts. `eval_ce` is the student's CE-only loss over every evaluation token of every rank
        (DistiLLM's validation loss, which `source: adaptive` follows), not a mean of batch means."""
        self._evaluation_ce = self._no_evaluation_ce()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        ce_sum, tokens = sum_over_ranks(self._evaluation_ce).tolist()
        output.metrics[f"{metric_key_prefix}_ce"] = ce_sum / tokens
        if self.args.eval_generation_size:
            rows = [dataloader.dataset[i] for i in range(min(self.args.eval_generation_size, len(dataloader.dataset)))]
            scores = self._greedy_scores(rows)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in scores.items()})
        return output

    def _no_evaluation_ce(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64, device=self.args.device)  # Σ CE, gold tokens

    @torch.no_grad()
    def _greedy_scores(self, rows: list[dict]) -> dict[str, float]:
        pad, eos = self.processing_class.pad_token_id, self.processing_class.eos_token_id
        predictions, references = [], []
        with eval_mode(self.accelerator.unwrap_model(self.model)) as student:
            for start in range(0, len(rows), self.args.per_device_eval_batch_size):
                batch = self._prepare_inputs(
                    self.data_collator(rows[start : start + self.args.per_device_eval_batch_size])
                )
                ids, mask = left_padded_prompts(batch["input_ids"], batch["labels"], pad)
                sampling = Sampling(min(self.args.max_new_tokens, self.args.max_length - ids.shape[1]), temperature=0)
                produced = rollout(student, None, ids, mask, Intervention("student"), sampling, eos, pad)
                predictions += self.processing_class.batch_decode(produced.sequences[:, ids.shape[1] :],
                                                                  skip_special_tokens=True)
                labels = batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, pad)
                references += self.processing_class.batch_decode(labels, skip_special_tokens=True)
        return {"rouge_l": rouge_l(predictions, references), "exact_match": exact_match(predictions, references)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{key}"] = torch.stack(values).mean().item()
        self._metrics[mode].clear()
        if mode == "train" and "loss" in logs:
            now = time.perf_counter()
            logs["supervised_tokens_per_second"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            logs["peak_memory_mb"] = peak_memory_mb(self.args.device)
            self._tokens_since_log, self._last_log_time = 0, now
        super().log(logs, start_time)

    @property
    def projectors(self) -> torch.nn.Module | None:
        """The objective's own trainable modules (DSKD's projectors), if it has any."""
        return getattr(self.objective, "projectors", None)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, plus the projectors in groups of their own (projector_learning_rate, or scaled
        to each projector layer: llmdistill.projector_rates)."""
        optimizer = super().create_optimizer(model)
        groups = self._projector_groups
        if groups and not any(group.get("projectors") for group in optimizer.param_groups):
            if self._projectors_in_model:  # the Trainer grouped them with the student's own parameters
                ours = {p for group in groups for p in group["params"]}
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if p not in ours]
            for group in groups:
                optimizer.add_param_group(group)
        return optimizer

    def _clip_grad_norm(self, model):
        if self._head_gradients is not None:
            self._head_gradients.average()  # every rank must clip by the same norm
        if self._projector_gradients is not None and not self.is_fsdp_enabled:
            # One norm over the student and the projectors, as DeepSpeed clips them inside the model; their
            # gradients are averaged first (once per step) so that every rank clips by the same norm.
            self._projector_gradients.average()
            parameters = [*model.parameters(), *self.projectors.parameters()]
            return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A plain HF folder (weights, config, tokenizer), the resolved `distill_config.yaml` and, for DSKD,
        `projectors.safetensors` beside it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            directory = Path(output_dir or self.args.output_dir)
            self.args.save_yaml(directory)
            if self.projectors is not None and not self._projectors_in_model:
                save_file(_contiguous(self.projectors.state_dict()), directory / PROJECTORS_FILENAME)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Under DeepSpeed the (gathered) state dict holds the projectors too: they go to their own file."""
        if self._projectors_in_model and self.args.should_save:  # other ranks hold no gathered state dict
            if state_dict is None:
                state_dict = self.accelerator.unwrap_model(self.model).state_dict()
            prefix = PROJECTORS_MODULE + "."
            projectors = {
                name.removeprefix(prefix): value for name, value in state_dict.items() if name.startswith(prefix)
            }
            state_dict = {name: value for name, value in state_dict.items() if not name.startswith(prefix)}
            directory = Path(output_dir or self.args.output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            save_file(_contiguous(projectors), directory / PROJECTORS_FILENAME)
        super()._save(output_dir, state_dict)

    def _save_rng_state(self, output_dir: str) -> None:
        """Besides the Trainer's RNG states: this rank's sequence source (draws, replay buffer, p_SGO) and the
        rollout's sampling generator."""
        super()._save_rng_state(output_dir)
        if self.sequences is not None:
            path = Path(output_dir) / SOURCE_STATE_FILENAME.format(rank=self.args.process_index)
            torch.save(self.sequences.state_dict(), path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self.sequences is None:
            return
        path = Path(checkpoint) / SOURCE_STATE_FILENAME.format(rank=self.args.process_index)
        if not path.is_file():
            raise ConfigError(
                f"resume_from_checkpoint: {path} is missing: the checkpoint was not written by a run with "
                f"source={self.args.source!r} on this many processes, so its draws, replay buffer and sampling state "
                "cannot be restored. Resume on as many processes as wrote it, or start a new output_dir."
            )
        self.sequences.load_state_dict(torch.load(path, weights_only=True))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; a checkpoint to resume from must exist and come from a run of this configuration."""
        if resume_from_checkpoint:
            resume_from_checkpoint = str(self._checkpoint_to_resume(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _checkpoint_to_resume(self, requested: str | bool) -> Path:
        """The checkpoint folder (`True`: the newest in output_dir), refused when it is missing or was written with
        other values of the options that decide what a checkpoint holds (RESUME_FIELDS)."""
        if requested is True:
            last = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if last is None:
                raise ConfigError(
                    f"resume_from_checkpoint='last': output_dir={self.args.output_dir!r} holds no checkpoint-N folder. "
                    "Set save_strategy (and save_steps) to write checkpoints, or unset resume_from_checkpoint."
                )
            requested = last
        checkpoint = Path(requested)
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            raise ConfigError(
                f"resume_from_checkpoint={str(checkpoint)!r} is not a checkpoint (no {TRAINER_STATE_NAME}): give a "
                "checkpoint-N folder from output_dir, or 'last'."
            )
        saved_path = checkpoint / CONFIG_FILENAME
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else {}
        for field in RESUME_FIELDS:
            if field in saved and saved[field] != getattr(self.args, field):
                raise ConfigError(
                    f"resume_from_checkpoint={str(checkpoint)!r} was written by a run with {field}={saved[field]!r}, "
                    f"this run has {field}={getattr(self.args, field)!r}: resume with the checkpoint's {field}, or "
                    "start a new output_dir."
                )
        return checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROJECTORS_FILENAME
        if self.projectors is not None and path.is_file() and not self._projectors_in_model:  # else DeepSpeed's
            self.projectors.load_state_dict(load_file(path, device=str(self.args.device)))


class _AdaptiveSchedule(TrainerCallback):
    """DistiLLM: the student's CE-only validation loss (`eval_ce`, not the CE + KD `eval_loss`) of each evaluation
    updates the probability of training on student generations; the first, measured before training, is the
    reference (distillm's finetune.py evaluates before its first step)."""

    def __init__(self, source: SequenceSource, evaluate):
        self.source, self.evaluate = source, evaluate

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run restores its reference from the checkpoint; with eval_on_start the Trainer measures it next.
        if state.global_step == 0 and not args.eval_on_start:
            self.evaluate()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.source.observe_eval_loss(metrics["eval_ce"])


class _AverageGradients(TrainerCallback):
    """Parameters no wrapper averages (the LM head outside FSDP's shards, DSKD projectors outside the model): their
    gradients averaged over the ranks once per optimizer step, before gradient clipping reads them
    (`DistillTrainer._clip_grad_norm`) or, without clipping, before the step."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters, self.pending = parameters, True

    def average(self) -> None:
        if self.pending:
            average_gradients_over_ranks(self.parameters)
            self.pending = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.average()

    def on_step_end(self, args, state, control, **kwargs):
        self.pending = True


class _ProjectorUpkeep(TrainerCallback):
    """Outside DeepSpeed the projectors are not in the model, so the Trainer's zeroing does not reach them: zero
    their gradients after each optimizer step (an `_AverageGradients` averages them over the ranks before it; inside
    the model, DeepSpeed's engine does both). The step also changed the student head, which the closed-form s2t
    projector is computed from, unless the head is frozen (LoRA): then s2t is computed once."""

    def __init__(self, projectors: torch.nn.Module, head_trains: bool, in_model: bool):
        self.projectors, self.head_trains, self.in_model = projectors, head_trains, in_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.head_trains and isinstance(self.projectors, DualSpaceProjectors):
            self.projectors.head_changed()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.in_model:
            self.projectors.zero_grad(set_to_none=True)


def _first_given(*candidates, name: str):
    for candidate in candidates:
        if candidate is not None:
            return candidate
    raise ConfigError(f"no {name} model: pass {name}= or set {name}_model_name_or_path.")


def _student_model(student, args: DistillConfig, peft_config) -> PreTrainedModel:
    """The student, loaded if named, with LoRA adapters under `peft_config` or args.use_peft."""
    if isinstance(student, str):
        student = load_model(student, args.model_dtype, args.trust_remote_code, field="student_model_name_or_path")
    peft_config = peft_config or args.lora_config()
    if peft_config is not None:
        set_seed(args.seed)  # the adapters' initialisation
        student = with_adapter(student, peft_config)
    return student


def _pad_id(tokenizer) -> int | None:
    return None if tokenizer is None else tokenizer.pad_token_id


def _supervised_count(labels: torch.Tensor) -> int:
    """Supervised (response) tokens of a batch; a batch without any is an error, never a silent zero loss."""
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if count == 0:
        raise DataError(
            "a batch has no supervised (response) token: every label is -100. Each example needs at least one "
            "response token; check the labels of pre-tokenised data."
        )
    return count


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident memory on CPU (model loading
    included: file pages mapped while loading count too)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def distill(config: DistillConfig) -> DistillTrainer:
    """Train the configured student and save it (plain HF folder + distill_config.yaml) to `output_dir`;
    `resume_from_checkpoint`: a checkpoint folder, or "last" for the newest one in `output_dir`."""
    trainer = DistillTrainer(args=config)
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model()
    return trainer
