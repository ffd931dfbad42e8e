// Placeholder: filled in by the direct work. Each schema file adds its own types and root fields to the builder.
