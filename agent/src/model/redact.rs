//! Redaction of secrets in what a process shows infermem: the values of secret-looking flags
//! (`--api-key`, `--hf-token`, `--token`, `--password`…) and variables (`HF_TOKEN`,
//! `OPENAI_API_KEY`, `AWS_SECRET_ACCESS_KEY`, `DB_PASSWORD`…) are replaced wherever infermem
//! prints or exports a command line, an environment or evidence.

/// What a secret value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Substrings of a flag or variable name (lower case, `-` as `_`) that mark its value secret.
const SECRET_SUBSTRINGS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "private_key",
    "access_key",
    "credential",
];
/// Whole `_`-separated words that do (`HF_TOKEN`, `--hf-token`, but not `--tokenizer` or
/// `--max-num-batched-tokens`).
const SECRET_WORDS: &[&str] = &["token", "auth"];

/// Whether a flag (`--hf-token`) or variable (`HF_TOKEN`) name looks like it holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let name = name
        .trim_start_matches('-')
        .to_ascii_lowercase()
        .replace('-', "_");
    SECRET_SUBSTRINGS.iter().any(|s| name.contains(s))
        || name.split('_').any(|word| SECRET_WORDS.contains(&word))
}

/// The command line with the values of secret-looking flags (`--api-key X`,
/// `--api-key=X`) and assignments (`HF_TOKEN=X`, as `env` passes them) redacted.
pub fn cmdline(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut redact_next = false;
    for arg in args {
        if std::mem::take(&mut redact_next) && !arg.starts_with("--") {
            out.push(REDACTED.to_owned());
            continue;
        }
        match arg.split_once('=') {
            Some((name, _)) if is_secret_name(name) => out.push(format!("{name}={REDACTED}")),
            None if arg.starts_with('-') && is_secret_name(arg) => {
                redact_next = true;
                out.push(arg.clone());
            }
            _ => out.push(arg.clone()),
        }
    }
    out
}

/// `(name, value)` pairs with the values of secret-looking names redacted.
pub fn environ(pairs: &[(String, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| match is_secret_name(name) {
            true => (name.clone(), REDACTED.to_owned()),
            false => (name.clone(), value.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn secret_flags_and_assignments_lose_their_values() {
        let redacted = cmdline(&args(
            "env HF_TOKEN=hf_abc OPENAI_API_KEY=sk-1 llama-server -m m.gguf --api-key s3cret \
             --hf-token=hf_xyz --token t0k -c 4096 --password pw --no-mmap",
        ));
        assert_eq!(
            redacted.join(" "),
            "env HF_TOKEN=<redacted> OPENAI_API_KEY=<redacted> llama-server -m m.gguf \
             --api-key <redacted> --hf-token=<redacted> --token <redacted> -c 4096 \
             --password <redacted> --no-mmap"
        );
        // A secret flag used as a switch leaves the next flag alone.
        assert_eq!(
            cmdline(&args("x --use-auth-token --ctx 8")).join(" "),
            "x --use-auth-token --ctx 8"
        );
    }

    #[test]
    fn secret_variables_lose_their_values() {
        let env: Vec<(String, String)> = [
            ("HF_TOKEN", "hf_1"),
            ("AWS_SECRET_ACCESS_KEY", "a"),
            ("DB_PASSWORD", "b"),
            ("OLLAMA_HOST", "127.0.0.1:1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let values: Vec<String> = environ(&env).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, [REDACTED, REDACTED, REDACTED, "127.0.0.1:1"]);
        for plain in [
            "--ctx-size",
            "LLAMA_ARG_N_GPU_LAYERS",
            "--tokenizer",
            "--max-num-batched-tokens",
        ] {
            assert!(!is_secret_name(plain), "{plain}");
        }
        assert!(is_secret_name("MY_DBPASSWORD") && is_secret_name("GITHUB_TOKEN"));
    }
}
