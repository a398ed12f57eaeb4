"""Which models the output metrics can be computed for, decided from the config before the model loads.

Torch-free, so the ingest refuses before the expensive load (ingest/output_metrics.py computes them).
"""

from __future__ import annotations

from selfrepair.errors import ConfigError
from selfrepair.store.schema import OUTPUT_METRICS


def check_output_metrics(metrics: str, spec, revision: str | None, architecture: str | None) -> None:
    """Raise ConfigError (one line) when the requested output metrics cannot be computed for the model."""
    if metrics == "none" or architecture not in _UNMODELLED:
        return
    from selfrepair.ingest.model_sizes import _hf_config  # the same offline read pre_load_facts made

    problem = metric_problem(metrics, architecture, _hf_config(spec, revision))
    if problem:
        raise ConfigError(problem)


def metric_problem(metrics: str, architecture: str | None, config) -> str | None:
    """Why the requested output metrics cannot be computed for a model (one line), or None.

    Needs only the model's config (before it loads). The metrics read the output head as
    `softcap(logit_scale · (norm(x) @ W.T + b))`; a model class known to transform its final
    logits otherwise is refused by name rather than measured wrongly.

    Args:
        metrics: `IngestConfig.output_metrics`.
        architecture: the config's causal-LM class (e.g. "GraniteForCausalLM"), or None.
        config: the Hugging Face config (attributes), or None when none can be read before the load.
    """
    if metrics == "none" or architecture not in _UNMODELLED:
        return None
    key, what = _UNMODELLED[architecture]
    value = getattr(config, key, None)
    if value in (None, 1, 1.0):
        return None
    return (f"output metrics ({', '.join(OUTPUT_METRICS)}) need the model's true output distribution, but "
            f"{architecture} {what} ({key}={value!r}), which selfrepair's unembedding does not model; "
            "use --output-metrics none")


# Causal-LM classes whose final logits are more than a linear head, a logit scale (Cohere's, read in
# ingest/weights.py) and a final softcap (Gemma 2 and 3), with the config key that says by how much.
_UNMODELLED = {
    "GraniteForCausalLM": ("logits_scaling", "divides its logits by a scale"),
    "GraniteMoeForCausalLM": ("logits_scaling", "divides its logits by a scale"),
    "GraniteMoeSharedForCausalLM": ("logits_scaling", "divides its logits by a scale"),
    "MiniCPMForCausalLM": ("dim_model_base", "scales its final hidden state by dim_model_base / hidden_size"),
}
