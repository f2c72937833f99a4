"""Small helpers with no model code: file writing, hashing, the allocator."""
