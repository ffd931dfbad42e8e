// Placeholder: filled in by the invite work. Each schema file adds its own types and root fields to the builder.
