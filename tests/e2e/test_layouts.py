"""The same accounting through the other ext_proc layouts: every phase sent, or streamed.

The shipped bootstrap skips the request headers (the request body carries their facts). A
server must keep working with a bootstrap that still sends every phase (operators upgrade one
side at a time), and with the layout that skips the response headers too. This module runs a
representative set of the end-to-end tests against the first; ``test_layouts_streamed`` does
the same for the second.
"""

from __future__ import annotations

import pytest

from extproc.devtools.envoyconf import Layout
from tests.e2e.test_access_log import (  # noqa: F401  (collected again against this stack)
    test_a_failed_answer_records_its_veto,
    test_a_stream_with_an_error_frame_records_its_veto,
    test_a_write_then_a_read_of_the_same_size,
)
from tests.e2e.test_accounting import (  # noqa: F401
    test_bad_markers_get_a_400_and_never_reach_the_upstream,
    test_first_request_writes_and_the_second_reads,
    test_json_answer_keeps_every_other_field,
)
from tests.e2e.test_agents import (  # noqa: F401
    test_a_bad_query_parameter_gets_the_400,
    test_a_tool_loop_reads_each_previous_turn_with_its_tool_calls,
    test_an_answer_without_provider_fields_stays_byte_identical,
    test_automatic_caching_follows_a_growing_conversation,
    test_hostile_values_reach_the_upstream_as_sent_and_markers_never,
    test_provider_cache_fields_are_scrubbed_from_inactive_answers,
    test_the_query_parameter_asks_for_automatic_caching_and_leaves_the_path,
)
from tests.e2e.test_no_commit import (  # noqa: F401
    test_error_frame_mid_stream_commits_nothing,
    test_non_2xx_answer_commits_nothing,
    test_upstream_reset_mid_stream_commits_nothing,
)
from tests.plugins.stack import StackSettings

pytestmark = pytest.mark.e2e

STACK = StackSettings(layout=Layout.HEADERS_FIRST)
