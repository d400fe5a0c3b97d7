import pytest

from servers.common.config import load_config
from servers.common.errors import ToolError


def test_env_overrides_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[cytoagent]\ndata_root = "/from/toml"\nworkers = 3\n[cytoagent.limits]\nmax_sessions = 2\n')
    cfg = load_config(toml, environ={"CYTOAGENT_WORKSPACE": str(tmp_path / "ws")})
    assert str(cfg.data_root) == "/from/toml" and cfg.workers == 3 and cfg.limits.max_sessions == 2
    assert cfg.workspace == (tmp_path / "ws").resolve()
    cfg2 = load_config(toml, environ={"CYTOAGENT_DATA_ROOT": str(tmp_path), "CYTOAGENT_REQUIRE_ISOLATION": "yes"})
    assert cfg2.data_root == tmp_path.resolve() and cfg2.require_isolation
    env = cfg2.env()
    assert env["CYTOAGENT_DATA_ROOT"] == str(tmp_path.resolve()) and env["CYTOAGENT_REQUIRE_ISOLATION"] == "1"


def test_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ToolError, match="not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ToolError, match="executor"):
        load_config(tmp_path / "missing.toml", environ={"CYTOAGENT_EXECUTOR": "slurm"})
