"""IngestConfig declares every setting once: the CLI's options, their defaults and the preset check follow from it."""

from __future__ import annotations

import dataclasses

import pytest

from selfrepair.cli_ingest import ingest
from selfrepair.errors import ConfigError, SettingConflict
from selfrepair.ingest.config import IngestConfig, flag_of
from selfrepair.ingest.presets import PRESETS


def test_every_cli_field_is_an_option_showing_the_configs_default():
    options = {p.name: p for p in ingest.params}
    cfg = IngestConfig()
    shown = [name for name, opt in options.items() if opt.show_default]
    assert {"model", "tokens", "seq_len", "batch_size", "top_p", "ablations", "dtype", "seed"} <= set(shown)
    # --units and its alias --heads have no default of their own: neither given means every head.
    assert cfg.units is None and cfg.heads is None and cfg.unit_spec == "heads"
    assert options["units"].help.endswith("Default: heads.")
    for f in dataclasses.fields(IngestConfig):
        if not f.metadata.get("cli", True):
            assert f.name not in options or f.name == "store"
            continue
        opt = options[f.name]
        assert opt.opts[0] == flag_of(f.name) or flag_of(f.name) in opt.opts
        assert opt.help == f.metadata.get("help")
        value = getattr(cfg, f.name)
        if opt.show_default and not opt.is_flag:
            # What --help shows is what a run without the flag gets.
            assert str(opt.default) == (",".join(value) if isinstance(value, tuple) else str(value)), f.name


def test_preset_fields_are_unset_until_the_config_resolves_them():
    preset_fields = {f.name for f in dataclasses.fields(IngestConfig) if "unset" in f.metadata}
    assert set(PRESETS["paper"]) <= preset_fields
    assert all(f.default is None for f in dataclasses.fields(IngestConfig) if f.name in preset_fields)
    plain = IngestConfig()
    assert (plain.seq_len, plain.batch_size, plain.top_p, plain.sr_mlps_neurons) == (128, 4, 0.02, "none")
    paper = IngestConfig(preset="paper", tokens=60 * 127)
    assert (paper.batch_size, paper.sr_mlps_neurons) == (30, "penultimate")


def test_a_value_equal_to_the_default_still_conflicts_with_the_preset():
    with pytest.raises(SettingConflict) as e:
        IngestConfig(preset="paper", tokens=60 * 127, batch_size=4)
    assert str(e.value) == "batch_size: 4 conflicts with preset paper (batch_size 30)"
    assert e.value.flags == "--batch-size 4 contradicts --preset paper (--batch-size 30)"
    assert IngestConfig(preset="paper", tokens=60 * 127, batch_size=30).batch_size == 30  # agreeing is fine


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "device: 'tpu' is not one of auto, cpu, cuda"),
    (dict(resamples=0), "resamples: must be positive, got 0"),
    (dict(neurons_top_k=-1), "neurons_top_k: must be >= 0, got -1"),
    (dict(heads="L1X2"), "heads: cannot parse 'L1X2'; use 'all' or labels like L9H11,L10"),
    (dict(ablations="resample,swap"), "ablations: unknown ablation type 'swap'; choose from resample, mean, zero"),
    (dict(workers=2), "workers: only with executor ray"),
])
def test_the_config_checks_each_setting_from_its_declaration(kwargs, message):
    with pytest.raises(ConfigError) as e:
        IngestConfig(**kwargs)
    assert str(e.value) == message
