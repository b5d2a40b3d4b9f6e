"""The controller state is checkpointed atomically and survives a restart."""

from __future__ import annotations

import json

import httpx

from .conftest import image_request, served_cnn, serving, wait_for
from .test_control import small_settings


def _control(state_dir, **kw):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    base = dict(policy="apparate", settings=small_settings(), initial=Config((0, 1), (0.0, 1.0)),
                state_dir=str(state_dir), checkpoint_every_s=3600)
    return ControlOptions(**{**base, **kw})


def _serve_some(live, n_requests: int) -> None:
    with httpx.Client(base_url=live.url) as c:
        for s in range(n_requests):
            assert c.post("/v2/models/tiny/infer", json=image_request(8, seed=s)).status_code == 200
    assert live.engine.flush()


def test_state_survives_a_restart(tiny_cnn, tmp_path):
    from apparate.serve.state import FILE, FORMAT

    with serving(served_cnn(tiny_cnn), control_opts=_control(tmp_path)) as a:
        _serve_some(a, 8)
        cfg_a = a.engine.live.config
        inputs_a = a.engine.control.controller.stats()["inputs"]
        profile_a = a.engine.control.profile
    assert cfg_a.version > 0 and inputs_a == 64
    saved = json.loads((tmp_path / FILE).read_text())  # written at shutdown
    assert saved["format"] == FORMAT and saved["policy"] == "apparate"
    assert saved["controller"]["config"] == cfg_a.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left behind

    with serving(served_cnn(tiny_cnn), control_opts=_control(tmp_path)) as b, httpx.Client(base_url=b.url) as c:
        st = c.get("/v2/models/tiny/earlyexit").json()
        assert st["config"]["sites"] == list(cfg_a.sites) and st["config"]["thresholds"] == list(cfg_a.thresholds)
        assert st["config"]["version"] == cfg_a.version
        assert st["restored"]["what"] == "profile, config, controller window"
        assert st["control"]["controller"]["inputs"] == inputs_a  # the window came back too
        assert b.engine.control.profile.vanilla(4) == profile_a.vanilla(4)
        # and it goes on from there
        r = c.post("/v2/models/tiny/infer", json=image_request(8, seed=99)).json()
        assert r["parameters"]["exit_sites"] == ",".join(["0"] * 8)


def test_periodic_checkpoints_while_serving(tiny_cnn, tmp_path):
    from apparate.serve.state import load_state

    with serving(served_cnn(tiny_cnn), control_opts=_control(tmp_path, checkpoint_every_s=0.1)) as live:
        _serve_some(live, 3)
        assert wait_for(lambda: (s := load_state(tmp_path)) is not None and s["controller"]["window"]["written"] == 24,
                        timeout=5)
        assert live.engine.control.last_checkpoint is not None


def _good_state(tiny_cnn, state_dir) -> dict:
    with serving(served_cnn(tiny_cnn), control_opts=_control(state_dir)) as live:
        _serve_some(live, 1)
    from apparate.serve.state import FILE

    return json.loads((state_dir / FILE).read_text())


def _unusable_cases(good: dict) -> dict:
    wrong_site = json.loads(json.dumps(good))
    wrong_site["controller"]["config"]["sites"] = [0, 7]
    static_wrong_site = {**json.loads(json.dumps(good)), "policy": "static", "config": {"sites": [5], "thresholds": [0.5]}}
    return {
        "truncated": json.dumps(good)[:200],
        "random bytes": bytes(range(256)) * 4,
        "not an object": "[1, 2, 3]",
        "wrong fields": json.dumps({"format": good["format"], "model": "x", "config": 3, "profile": []}),
        "model fields of the wrong types": json.dumps({**good, "model": {"fingerprint": 7, "num_sites": "two"}}),
        "a profile that is not one": json.dumps({**good, "profile": {"format": "nope"}}),
        "a controller naming a site the bundle lacks": json.dumps(wrong_site),
        "a config naming a site the bundle lacks": json.dumps(static_wrong_site),
        "another model": json.dumps({**good, "model": {**good["model"], "fingerprint": "other"}}),
        "a directory": None,
    }


def test_unusable_state_is_ignored_moved_aside_and_the_start_is_fresh(tiny_cnn, tmp_path):
    from apparate.serve.state import FILE, load_state

    good = _good_state(tiny_cnn, tmp_path / "good")
    for i, (name, content) in enumerate(_unusable_cases(good).items()):
        d = tmp_path / f"case{i}"
        d.mkdir()
        target = d / FILE
        if content is None:
            target.mkdir()
            (target / "x").write_text("a directory where the state file should be")
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        policy = "static" if name == "a config naming a site the bundle lacks" else "apparate"
        with serving(served_cnn(tiny_cnn), control_opts=_control(d, policy=policy)) as live:
            restored = live.engine.control.restored
            assert restored["from"] is None and restored["ignored"], name
            assert live.engine.live.config.version == 0, name  # placed afresh
            _serve_some(live, 1)
        aside = [p for p in d.iterdir() if p.name.startswith(FILE + ".unusable-")]
        assert len(aside) == 1 and restored["moved_to"] == str(aside[0]), name  # kept, not deleted
        assert (aside[0].is_dir() if content is None else aside[0].read_bytes() ==
                (content if isinstance(content, bytes) else content.encode())), name
        saved = load_state(d)  # the fresh start's checkpoint is a good one
        assert saved is not None and saved["policy"] == policy, name


def test_changed_settings_keep_ramps_and_profile(tiny_cnn, tmp_path):
    with serving(served_cnn(tiny_cnn), control_opts=_control(tmp_path)) as a:
        _serve_some(a, 4)
        cfg_a = a.engine.live.config
    with serving(served_cnn(tiny_cnn),
                 control_opts=_control(tmp_path, settings=small_settings(accuracy_constraint=0.02))) as b:
        assert b.engine.control.restored["what"] == "profile, config (settings changed)"
        assert b.engine.live.config == cfg_a
        assert b.engine.control.controller.settings.accuracy_constraint == 0.02
    # A static server started on an apparate state takes only the measured profile.
    with serving(served_cnn(tiny_cnn), control_opts=_control(tmp_path, policy="static")) as s:
        assert s.engine.control.restored["what"] == "profile"
