"""Applications built on the library: `batch` (a folder tree, resumable, local processes or Ray) and `evaluate`
(what compression keeps of the user's own documents). They take `Settings` explicitly and report progress through
callbacks; the CLI draws the bars."""
