"""docs/config.md is what `edgegate config-reference` prints (the real binary).

The reference is generated from the code (keys, types, defaults, allowed
values) and config/edgegate.toml's comments (descriptions); the cargo test
`config_ref::tests::docs_config_md_is_current` compares the same text
without the binary, this test the command an operator runs.
"""

import subprocess

from conftest import BIN, REPO


def test_config_reference_command_prints_docs_config_md():
    out = subprocess.run([str(BIN), "config-reference"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    committed = (REPO / "docs" / "config.md").read_text()
    assert out.stdout.decode() == committed, (
        "docs/config.md is out of date: run "
        "`cargo run -p edgegate -- config-reference > docs/config.md`"
    )
    # Every key has its environment variable, allowed values come from enums.
    assert "`EDGEGATE_WS__LISTEN`" in committed
    assert '| one of `"off"`, `"negotiate"` | `"negotiate"` |' in committed
