"""Configuration round trips and the event log's numbering."""

import json

import pytest

from VQMedSegLib.config import PRESETS, TrainConfig, config_from_preset, train_config_from_preset
from VQMedSegLib.errors import ConfigError
from VQMedSegLib.jobs.events import EventLog, read_events


def test_config_round_trips_through_json():
    cfg = train_config_from_preset("tiny", seed=3)
    again = TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg and again.seed == 3 and again.iterations == 30


@pytest.mark.parametrize(
    "data, message",
    [
        ({"iterationz": 3}, "unknown key.*'iterationz'"),
        ({"iterations": "many"}, "'iterations': found str 'many', expected an integer"),
        ({"learning_rate": True}, "'learning_rate'.*expected a number"),
        ({"slice_size": 100}, "'slice_size': found 100, expected a multiple of 16"),
        ({"features": [1, 2]}, "'features'"),
    ],
)
def test_config_rejects_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_json(data)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="c.json: not valid JSON"):
        config_from_preset(TrainConfig, PRESETS, "tiny", {}, config_file=bad)


def test_a_config_file_is_laid_over_the_preset_and_options_over_both(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"iterations": 7, "learning_rate": 0.01}), encoding="utf-8")
    config = config_from_preset(TrainConfig, PRESETS, "tiny", {"iterations": 9, "seed": None}, config_file=path)
    # the file's keys replace the preset's, the options the file's; the rest is the preset
    assert config == train_config_from_preset("tiny").replace(iterations=9, learning_rate=0.01)
    assert config_from_preset(TrainConfig, PRESETS, "cpu", {}, config_file=path) == \
        train_config_from_preset("cpu").replace(iterations=7, learning_rate=0.01)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"iteratoins": 3}, "partial.json: unknown key.*'iteratoins'"),
        ({"iterations": "many"}, "partial.json: config key 'iterations': found str 'many', expected an integer"),
        ({"slice_size": 100}, "partial.json: config key 'slice_size': found 100, expected a multiple of 16"),
        ([1, 2], "partial.json: found list, expected a JSON object"),
    ],
)
def test_errors_in_a_config_file_laid_over_a_preset_name_the_file(tmp_path, data, message):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        config_from_preset(TrainConfig, PRESETS, "tiny", {}, config_file=path)


def test_events_are_numbered_and_gaps_and_truncation_are_reported(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, job="j1")
    for i in range(3):
        log.emit("progress", done=i)
    assert [e["seq"] for e in read_events(path).events] == [1, 2, 3]
    # a writer killed mid-line leaves a truncated tail
    with open(path, "ab") as f:
        f.write(b'{"seq": 4, "type": "progr')
    r = read_events(path)
    assert r.truncated_tail and [e["seq"] for e in r.events] == [1, 2, 3]
    # the next writer starts on a fresh line and continues the numbering
    log.emit("progress", done=3)
    # lose a line: the reader reports the gap
    lines = path.read_text().splitlines()
    path.write_text("\n".join(l for l in lines if '"seq": 2' not in l) + "\n")
    r = read_events(path)
    assert [e["seq"] for e in r.events] == [1, 3, 4]
    assert r.gaps == [(1, 3)] and r.bad_lines == 1 and not r.truncated_tail


def test_incremental_reads_return_only_new_events(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("a")
    first = read_events(path)
    log.emit("b")
    second = read_events(path, offset=first.offset, after_seq=first.events[-1]["seq"])
    assert [e["type"] for e in second.events] == ["b"]


def test_json_files_missing_corrupt_or_binary_are_named_with_what_was_expected(tmp_path):
    from VQMedSegLib.errors import InputError, WorkspaceError
    from VQMedSegLib.files import read_json
    from VQMedSegLib.jobs.workspace import Workspace

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(good) == {"a": [1, 2]}
    with pytest.raises(InputError, match=r"missing.json: not found; expected the thing"):
        read_json(tmp_path / "missing.json", expected="the thing")
    (tmp_path / "bad.json").write_text('{"a": ', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(.* at line 1\)"):
        read_json(tmp_path / "bad.json", ConfigError)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="binary.json: not UTF-8 text"):
        read_json(tmp_path / "binary.json")
    with pytest.raises(InputError, match="could not be read"):
        read_json(tmp_path)  # a folder

    ws = Workspace.create(tmp_path / "ws")
    ws.state_path.write_text("{", encoding="utf-8")
    with pytest.raises(WorkspaceError, match=r"state.json: not valid JSON"):
        Workspace.open(ws.root)
    ws.state_path.unlink()
    with pytest.raises(WorkspaceError, match=r"state.json: not found; expected .*vqmedseg workspace init"):
        Workspace.open(ws.root)
