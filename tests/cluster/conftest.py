"""Makes the cluster fixtures available to tests/cluster even when tests/conftest.py does not
(yet) list ``pytest_plugins = ["tests.cluster.fixtures"]``; never registers them twice."""

PLUGIN = "tests.cluster.fixtures"


def pytest_configure(config):
    pm = config.pluginmanager
    if not pm.has_plugin(PLUGIN):
        pm.import_plugin(PLUGIN)
