"""App pages open without exceptions (streamlit's AppTest, no browser)."""
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO


def test_overview_page_lists_installed_packages_and_models():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert "lowbit" in at.title[0].value
    tables = [df.value for df in at.dataframe]
    assert any("torch" in set(t.get("package", [])) for t in tables)
    assert any("smollm2-135m" in set(t.get("name", [])) for t in tables)
