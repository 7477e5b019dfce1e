"""Old path of ``unit_fast.nn.hungarian_matcher``: importing this gives that very module.

``HungarianMatcher`` is a drop-in ``nn.Module``, so it lives in ``unit_fast.nn``.  The module
object is aliased (not re-exported) so that code which patches this path's globals, e.g.
``monkeypatch.setattr(matcher, "matching_cost", spy)``, still reaches the matcher's code.
"""

import sys

from unit_fast.nn import hungarian_matcher as _hungarian_matcher

sys.modules[__name__] = _hungarian_matcher
