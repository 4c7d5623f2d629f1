"""``editor-reid ablate``: the rows' switches, the table, resuming a study and the usage errors."""

import json

import pytest

from editor_reid.config import ConfigError, dump_config
from editor_reid.engine import ablate
from editor_reid.engine.ablate import check_overrides, format_ablation, parse_rows, row_config, run_ablation
from editor_reid.errors import TrainingInterrupted

from _cli import exit_code, one_line
from _tiny import train_cfg

ONE_EPOCH = ("solver.max_epochs=1", "solver.eval_period=1", "solver.checkpoint_period=0")


def _epoch_losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "epoch")


def test_rows_set_the_module_switches(tmp_path):
    cfg = train_cfg(tmp_path / "data", tmp_path / "out")
    expected = {  # sfts, hma, bcc, ocfr
        "A": (False, False, False, False), "B": (False, True, False, False), "C": (True, True, False, False),
        "D": (True, True, True, False), "E": (True, True, False, True), "F": (True, True, True, True),
    }
    for row, switches in expected.items():
        out = row_config(cfg, row)
        assert (out.model.sfts, out.model.hma, out.model.bcc, out.model.ocfr) == switches, row
        assert out.output_dir == str(tmp_path / "out" / f"row_{row}")
    assert (cfg.model.sfts, cfg.model.hma, cfg.model.bcc, cfg.model.ocfr) == (True, True, True, True)  # a copy


def test_parse_rows_orders_and_rejects():
    assert parse_rows("f, a,c") == ["A", "C", "F"]
    for text, fragment in (("A,G", "unknown row 'G'"), ("A,B,a", "row A is given more than once"),
                           (" , ", "expected comma-separated rows")):
        with pytest.raises(ConfigError, match=fragment):
            parse_rows(text)


def test_overrides_may_agree_with_the_rows_but_not_contradict_them():
    check_overrides(["A", "B"], ["model.sfts=false", "solver.base_lr=0.1"])
    check_overrides(["C", "F"], ["MODEL.HMA=yes"])
    with pytest.raises(ConfigError, match=r"'model.sfts=true' contradicts row A .*model.sfts=false"):
        check_overrides(["A", "F"], ["model.sfts=true"])
    with pytest.raises(ConfigError, match="contradicts row F"):
        check_overrides(["A", "F"], ["model.bcc=false"])


@pytest.mark.parametrize("argv, fragment", [
    (["--rows", "A,X"], "unknown row 'X'"),
    (["--rows", "C,C"], "row C is given more than once"),
    (["--rows", "A,C", "model.hma=true"], "contradicts row A"),
    (["--rows", "D", "model.ocfr=true"], "contradicts row D"),
    (["--rows", "D", "model.bcc_weight=0"], "model.bcc_weight is 0"),
    (["--seeds", "1,2,1"], "seed 1 is given more than once"),
    (["--seeds", "1,x"], "'x' is not a seed"),
    (["--json", "/nonexistent/folder/a.json"], "ablate --json /nonexistent/folder/a.json: expected a file path"),
])
def test_bad_command_lines_are_one_line_usage_errors(tmp_path, capsys, argv, fragment):
    status = exit_code(["ablate", "--config", "demo", f"output_dir={tmp_path / 'out'}", *argv])
    assert status == 2
    assert fragment in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_ablation_trains_tables_and_resumes(train_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(train_cfg(train_data, out, *ONE_EPOCH)))
    json_out = tmp_path / "ablation_copy.json"
    assert exit_code(["ablate", "--config", str(config), "--rows", "F,A", "--seeds", "5,6",
                      "--json", str(json_out)]) == 0
    table = capsys.readouterr().out

    result = json.loads(json_out.read_text())
    assert json.loads((out / "ablation.json").read_text()) == result
    assert list(result["rows"]) == ["A", "F"] and result["seeds"] == [5, 6]
    for row in ("A", "F"):
        r = result["rows"][row]
        assert r["final_epochs"] == [1, 1] and r["best_epochs"] == [1, 1]
        assert len(r["final"]["mAP"]["values"]) == 2 and r["final"]["mAP"]["std"] >= 0
        for seed in (5, 6):
            assert (out / f"row_{row}" / f"seed_{seed}" / "checkpoints" / "last.pt").is_file()
        assert (out / f"row_{row}" / "seeds_summary.json").is_file()
    assert result["rows"]["A"]["paper"]["mAP"] == 54.0 and result["rows"]["F"]["paper"]["rank10"] == 89.1
    # The switches reach the runs: BCC and OCFR add loss only in row F.
    plain, full = _epoch_losses(out / "row_A" / "seed_5"), _epoch_losses(out / "row_F" / "seed_5")
    assert plain["loss_bcc"] == 0.0 and plain["loss_ocfr"] == 0.0
    assert full["loss_bcc"] > 0.0

    lines = table.splitlines()
    assert "mean ± std over 2 seed(s) (5,6)" in lines[0]
    assert lines[1].split()[:6] == ["row", "SFTS", "HMA", "BCC", "OCFR", "epoch"]
    final_a = next(line for line in lines if line.startswith("A "))
    assert final_a.split()[1:5] == ["×", "×", "×", "×"] and "final (epoch 1)" in final_a
    assert f"{100 * result['rows']['A']['final']['mAP']['mean']:.1f} ± " in final_a
    assert sum("best (epoch 1, test)" in line for line in lines) == 2
    paper_lines = [line.split() for line in lines if line.split()[:1] == ["paper"]]
    assert paper_lines == [["paper", "54.0", "53.5", "70.2", "78.8"], ["paper", "65.7", "68.8", "82.5", "89.1"]]
    assert any("model.al=1" in line for line in lines)  # the tiny run is not the paper's BL setting

    # Running it again trains nothing and reports the same table.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("row_*/seed_*/checkpoints/last.pt")}
    assert len(stamps) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("editor_reid.engine.train.Trainer.train_epoch", no_training)
    again = run_ablation(train_cfg(train_data, out, *ONE_EPOCH), ["A", "F"], [5, 6])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["rows"] == result["rows"]

    # A row added later trains only its own runs; a changed recipe is refused before any training.
    monkeypatch.undo()
    more = run_ablation(train_cfg(train_data, out, *ONE_EPOCH), ["A", "B"], [5])
    assert list(more["rows"]) == ["A", "B"] and (out / "row_B" / "seed_5" / "checkpoints" / "last.pt").is_file()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ConfigError, match=r"row_A/seed_5 was trained with solver.base_lr=0.01 .* 0.02"):
        run_ablation(train_cfg(train_data, out, *ONE_EPOCH, "solver.base_lr=0.02"), ["A", "C"], [5])
    assert not (out / "row_C").exists()


def test_interrupted_row_says_how_to_continue(tmp_path, monkeypatch):
    def stopped(cfg, seeds, **options):
        raise TrainingInterrupted("training stopped by SIGINT at epoch 3, step 2; its state is saved in X/last.pt. "
                                  "Continue with: editor-reid train --resume X. For the whole sweep, run the same "
                                  "train --seeds command again", 2)

    monkeypatch.setattr("editor_reid.engine.sweep.train_seeds", stopped)
    with pytest.raises(TrainingInterrupted) as caught:
        run_ablation(train_cfg(tmp_path, tmp_path / "out"), ["C"], [1])
    message = str(caught.value)
    assert message.startswith("row C: training stopped by SIGINT at epoch 3, step 2")
    assert "same ablate command again" in message and "train --seeds" not in message
    assert caught.value.exit_code == 130


def _result(dataset: str) -> dict:
    metrics = {k: {"mean": 0.5, "std": 0.01, "values": [0.49, 0.51]} for k in ("mAP", "rank1", "rank5", "rank10")}
    rows = {}
    for row in ("B", "E"):
        paper = ablate.PAPER_ROWS.get(dataset, {}).get(row)
        rows[row] = {"adds": ablate.ROWS[row][0], "switches": dict(zip(("sfts", "hma", "bcc", "ocfr"),
                                                                      ablate.ROWS[row][1])),
                     "run_dir": f"out/row_{row}", "final": metrics, "best": metrics, "final_epochs": [12, 12],
                     "best_epochs": [9, 12], "paper": dict(zip(ablate.TABLE_KEYS, paper)) if paper else None}
    return {"dataset": dataset, "data": "d", "model_al": 0, "output_dir": "out", "seeds": [1, 2], "rows": rows}


def test_table_labels_epochs_and_paper_rows_only_for_the_papers_datasets():
    text = format_ablation(_result("rgbnt100"))
    assert "final (epoch 12)" in text and "best (epochs 9,12, test)" in text
    assert "50.0 ± 1.0" in text
    assert "77.8" in text and "80.4" in text and "RGBNT100" in text  # rows B and E of the paper
    assert "model.al=1" not in text
    other = format_ablation(_result("msvr310"))
    assert "paper" not in other and "50.0 ± 1.0" in other

