"""Dataset formats, label splits and benchmark builders."""
