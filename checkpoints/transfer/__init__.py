"""State between peers (being restructured; see the package map once complete)."""
