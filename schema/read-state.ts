// Placeholder: filled in by the read-state work. Each schema file adds its own types and root fields to the builder.
