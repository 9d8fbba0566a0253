"""The end of a run: report.json (losses, memory, checkpoints, settings) and the sample answers of the
base model and the adapter to the configured prompts."""

from __future__ import annotations

import math
from pathlib import Path

from engine import atomic
from engine import protocol as ev
from engine.model.memory import memory_stats


class Reporting:
    """TrainingRun's report and samples (TrainingRun inherits them)."""

    def _report(self, status: str, elapsed: float, last_loss: float | None, adapter_dir: Path) -> dict:
        import mlx.core as mx

        from engine.train.validation import perplexity
        best = self.store.best()
        mem = memory_stats()
        report = {
            "status": status, "step": self.step, "total_steps": self.total_steps,
            "final_train_loss": last_loss,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "best_val_perplexity": None if math.isinf(self.best_val) else perplexity(self.best_val),
            "last_val_loss": getattr(self, "last_val", None),
            "trainable_params": self.trainable, "total_params": self.total_params,
            "tokens_seen": self.tokens_seen,
            "seconds": round(self.elapsed_before + elapsed, 2), "seconds_this_session": round(elapsed, 2),
            "tokens_per_sec": round(self.session_tokens / elapsed, 1) if elapsed > 0 else None,
            "peak_memory": {"mlx_peak_bytes": mx.get_peak_memory(), "rss_bytes": mem.rss_bytes,
                            "estimated_bytes": self.memory_estimate.total if self.memory_estimate else None},
            "device": str(mx.default_device()), "blas": self.blas.name, "dtype": self.info.dtype,
            "adapter": str(adapter_dir), "best_checkpoint": str(best.path) if best else None,
            "checkpoints": [str(c.path) for c in self.store.list()],
            "losses": self.losses, "data": self.data.report.to_dict(), "config": self.cfg.to_dict(),
            "resumes": self.resumes, "samples": [],
        }
        atomic.write_json(self.run_dir / "report.json", report)  # before the samples: a stop there loses nothing
        report["samples"] = self._samples()
        if report["samples"]:
            atomic.write_json(self.run_dir / "report.json", report)
        return report

    def _samples(self) -> list[dict]:
        """The configured prompts answered by the base model and by the adapter (one model in memory); a stop
        ends them between prompts or tokens."""
        from engine.model.adapters import adapters_disabled
        from engine.generate.reply import GenerationSettings
        e = self.cfg.evaluation
        settings = GenerationSettings(e.max_tokens, e.temperature, e.top_p)
        out = []
        self.model.eval()
        for prompt in e.sample_prompts:
            messages = [{"role": "user", "content": prompt}]
            adapter = self._answer(messages, settings)
            with adapters_disabled(self.model):
                base = None if adapter is None else self._answer(messages, settings)
            if base is None:
                break  # a user who pressed stop wants out, not more generation
            self.emit(ev.Sample(self.step, prompt, base, adapter))
            out.append({"prompt": prompt, "base": base, "adapter": adapter})
        return out

    def _answer(self, messages: list[dict], settings) -> str | None:
        """The model's reply, or None when a stop came first."""
        from contextlib import closing

        from engine.generate.reply import stream_reply
        parts = []
        if self.control.stop_requested:
            return None
        with closing(stream_reply(self.model, self.tokenizer, messages, settings)) as chunks:
            for chunk in chunks:
                if self.control.stop_requested:
                    return None
                parts.append(chunk.text)
        return None if self.control.stop_requested else "".join(parts).strip()
