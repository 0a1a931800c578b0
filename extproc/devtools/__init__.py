"""The local stack, the demo upstream and Envoy config rendering: installed with the dev extra.

Nothing here is imported by ``extproc serve``: the server needs none of aiohttp, httpx or
PyYAML, and these modules are imported only by the commands that use them.
"""
