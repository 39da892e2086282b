"""Distill recipes: `extends` inheritance (deep merge, cycles, unknown parents) and `--print-config`."""
from __future__ import annotations

import dataclasses
import sys

import pytest
from click.testing import CliRunner

from conftest import cli_without_torch
from mirage_edge.cli import cli
from mirage_edge.config import dumps_toml, from_dict, read_file
from mirage_edge.distill.recipe import RECIPES_DIR, DistillRecipe, load_recipe
from mirage_edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _write(path, text):
    path.write_text(text)
    return path


def test_child_merges_tables_over_its_parent(tmp_path):
    _write(tmp_path / "base.toml", 'name = "base"\n[stage1]\nepochs = 4\nlr = 2e-3\n'
                                   '[stage2]\nloss = { alpha = 0.7, temperature = 4.0 }\n'
                                   '[teacher]\nlayers = [1, 2]\n')
    child = _write(tmp_path / "child.toml", 'extends = "base.toml"\nname = "child"\n[stage1]\nepochs = 9\n'
                                            '[stage2.loss]\nalpha = 0.5\n[teacher]\nlayers = [3]\n')
    r = load_recipe(child)
    assert r.name == "child"
    assert (r.stage1.epochs, r.stage1.lr) == (9, 2e-3)  # sibling keys of a table survive
    assert (r.stage2.loss.alpha, r.stage2.loss.temperature) == (0.5, 4.0)  # nested (inline) tables merge
    assert r.teacher.layers == [3]  # lists are replaced, not appended
    # overrides still come last
    assert load_recipe(child, ["stage1.epochs=1"]).stage1.epochs == 1


def test_chain_of_parents_and_curated_names(tmp_path):
    (tmp_path / "sub").mkdir()
    mid = _write(tmp_path / "sub" / "mid.toml", 'extends = "cls-tiny"\nname = "mid"\n[stage2]\nepochs = 3\n')
    top = _write(tmp_path / "top.toml", 'extends = "sub/mid.toml"\nname = "top"\n[qat]\nenabled = false\n')
    r, base = load_recipe(top), load_recipe("cls-tiny")
    assert (r.name, r.stage2.epochs, r.qat.enabled) == ("top", 3, False)
    same = dataclasses.replace(r, name=base.name, qat=dataclasses.replace(r.qat, enabled=True),
                               stage2=dataclasses.replace(r.stage2, epochs=base.stage2.epochs))
    assert same == base
    assert load_recipe(mid).name == "mid"


def test_extends_cycle_names_the_chain(tmp_path):
    _write(tmp_path / "a.toml", 'extends = "b.toml"\nname = "a"\n')
    _write(tmp_path / "b.toml", 'extends = "c.toml"\n')
    _write(tmp_path / "c.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"cycle: .*a\.toml -> .*b\.toml -> .*c\.toml -> .*a\.toml"):
        load_recipe(tmp_path / "a.toml")
    _write(tmp_path / "self.toml", 'extends = "self.toml"\n')
    with pytest.raises(ConfigError, match=r"cycle: .*self\.toml -> .*self\.toml"):
        load_recipe(tmp_path / "self.toml")


def test_unknown_parent_is_a_clear_error(tmp_path):
    bad = _write(tmp_path / "bad.toml", 'extends = "cls-tinyy"\n')
    with pytest.raises(ConfigError, match=r"extends = 'cls-tinyy'.*bad\.toml.*curated name.*cls-tiny"):
        load_recipe(bad)
    # a path with folders is only a path: no fallback to a curated recipe of the same name
    _write(bad, 'extends = "elsewhere/cls-tiny.toml"\n')
    with pytest.raises(ConfigError, match="elsewhere/cls-tiny.toml"):
        load_recipe(bad)
    _write(bad, "extends = 3\n")
    with pytest.raises(ConfigError, match="must be a config name or path"):
        load_recipe(bad)
    # keys of a child are checked as strictly as any recipe's
    _write(bad, 'extends = "cls-tiny"\n[stage1]\nepoch = 3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'stage1.epoch' in .*bad\.toml.*did you mean"):
        load_recipe(bad)


def test_cls_tiny_vit_is_cls_tiny_plus_its_differences():
    vit, base = load_recipe("cls-tiny-vit"), load_recipe("cls-tiny")
    assert read_file(RECIPES_DIR / "cls-tiny-vit.toml")["extends"] == "cls-tiny"
    assert vit.student.name == "vit_tiny_c32" and vit.qat.model_type == "transformer"
    assert (vit.stage1.epochs, vit.stage1.warmup_steps, vit.stage2.lr) == (30, 70, 5e-4)
    # everything the file does not mention comes from cls-tiny
    assert vit.data == base.data and vit.run == base.run and vit.teacher == base.teacher
    assert (vit.stage1.lr, vit.stage2.loss, vit.qat.lr, vit.qat.subset_size) == \
        (base.stage1.lr, base.stage2.loss, base.qat.lr, base.qat.subset_size)


def test_print_config_resolves_flags_and_overrides():
    r = CliRunner().invoke(cli, ["distill", "--recipe", "cls-tiny-vit", "--image-size", "64", "--qat",
                                 "--print-config", "stage1.epochs=2"])
    assert r.exit_code == 0, r.output
    printed = tomllib.loads(r.output)
    assert "extends" not in printed
    expected = load_recipe("cls-tiny-vit", ["stage1.epochs=2"],
                           sets={"data.image_size": 64, "qat.enabled": True})
    assert from_dict(DistillRecipe, printed) == expected  # the printout is the complete recipe
    assert printed["stage1"]["epochs"] == 2 and printed["data"]["image_size"] == 64


def test_print_config_reports_bad_recipes_and_needs_no_torch():
    r = CliRunner().invoke(cli, ["distill", "--recipe", "tiny-demo", "--print-config", "stage1.epoch=3"])
    assert r.exit_code != 0 and "stage1.epoch" in r.output
    proc = cli_without_torch("distill", "--recipe", "cls-tiny-vit", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert 'name = "cls-tiny-vit"' in proc.stdout and 'model_type = "transformer"' in proc.stdout


def test_per_student_settings_apply_to_their_family_below_the_command_line(tmp_path):
    rec = _write(tmp_path / "r.toml", 'extends = "duke-fluid"\n[stage2]\nepochs = 3\n'
                                      '[per_student.resnet18]\n"qat.lr" = 2e-4\n"stage2.head" = {}\n')
    base = load_recipe(rec)
    assert base.student.name == "mobilenetv4_conv_small" and base.qat.lr == 5e-5  # not this family
    r18 = load_recipe(rec, sets={"student.name": "resnet18"})
    assert r18.qat.lr == 2e-4 and r18.stage2.head == {}  # a table value replaces the file's FPN head
    assert r18.stage2.epochs == 3 and r18.applied_per_student == {"qat.lr": 2e-4, "stage2.head": {}}
    assert r18.per_student == {} and base.applied_per_student == {}  # consumed: the resolved recipe is complete
    # flags and overrides still win over the family's settings, also when the resolved recipe is read back
    over = load_recipe(rec, ["qat.lr=1e-3"], sets={"student.name": "resnet18"})
    assert over.qat.lr == 1e-3
    saved = _write(tmp_path / "saved.toml", dumps_toml(over.to_dict()))
    assert load_recipe(saved) == over
    assert load_recipe(rec, sets={"student.name": "resnet18", "qat.lr": 3e-4}).qat.lr == 3e-4
    # the curated Duke recipe ships what distill/README measured for RepViT and the ViT
    rep = load_recipe("duke-fluid", sets={"student.name": "repvit_m0_9"})
    assert (rep.qat.epochs, rep.qat.lr, rep.qat.subset_size) == (8, 1e-4, 64)
    vit = load_recipe("duke-fluid-fast", ["student.name=vit_tiny_c32"])
    assert vit.stage2.head == {} and vit.qat.model_type == "transformer" and vit.stage1.warmup_steps == 16


def test_per_student_mistakes_name_the_family(tmp_path):
    bad = _write(tmp_path / "bad.toml", 'extends = "duke-fluid"\n[per_student.resnet18]\n"qat.epochz" = 2\n')
    load_recipe(bad)  # another family: not applied, not an error
    with pytest.raises(ConfigError, match=r"per_student\.resnet18.*qat\.epochz"):
        load_recipe(bad, sets={"student.name": "resnet18"})
    rename = _write(tmp_path / "rename.toml", '[per_student.resnet18]\n"student.name" = "vit_tiny_c32"\n')
    with pytest.raises(ConfigError, match=r"per_student\.resnet18 may not set student\.name"):
        load_recipe(rename)


def test_print_config_round_trips_per_student_settings():
    r = CliRunner().invoke(cli, ["distill", "--recipe", "duke-fluid", "--student", "vit_tiny_c32", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = tomllib.loads(r.output)
    assert printed["applied_per_student"]["qat.model_type"] == "transformer"  # one quoted key, not a table
    assert from_dict(DistillRecipe, printed) == load_recipe("duke-fluid", sets={"student.name": "vit_tiny_c32"})
