// Placeholder: filled in by the message work. Each schema file adds its own types and root fields to the builder.
