"""The same accounting with both headers phases skipped: answers streamed, JSON held whole.

The tests are those of ``test_layouts``, collected again against this module's stack.
"""

from __future__ import annotations

import pytest

from extproc.devtools.envoyconf import Layout
from tests.e2e import test_layouts
from tests.plugins.stack import StackSettings

pytestmark = pytest.mark.e2e

globals().update({n: f for n, f in vars(test_layouts).items() if n.startswith("test_")})

STACK = StackSettings(layout=Layout.STREAMED)
