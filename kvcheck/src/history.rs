//! A history saved as JSON lines: one [`Operation`] a line, in the order
//! given, so that a run can be checked again or read by other tools.

use std::io::{BufRead, Write};

use crate::linearizability::Operation;

/// Writes `history` to `out`, one JSON object a line.
pub fn write(out: &mut impl Write, history: &[Operation]) -> std::io::Result<()> {
    for op in history {
        serde_json::to_writer(&mut *out, op)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads what [`write`] wrote; blank lines are skipped, a bad line is an
/// error naming its number.
pub fn read(input: impl BufRead) -> std::io::Result<Vec<Operation>> {
    let mut ops = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {}: {e}", n + 1),
            )
        })?;
        ops.push(op);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linearizability::Kind;

    #[test]
    fn a_history_survives_a_round_trip() {
        let ops = vec![
            Operation {
                key: "k1".into(),
                kind: Kind::Cas {
                    expected: None,
                    new: 7,
                    ok: Some(false),
                },
                call: 1,
                ret: None,
                client: usize::MAX,
            },
            Operation {
                key: "k2".into(),
                kind: Kind::Delete {
                    existed: Some(true),
                },
                call: 2,
                ret: Some(3),
                client: 4,
            },
        ];
        let mut buf = Vec::new();
        write(&mut buf, &ops).expect("writing to memory");
        let text = String::from_utf8(buf.clone()).expect("JSON is UTF-8");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(read(&buf[..]).expect("reading back"), ops);
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = read(&b"\n{\"key\":1}\n"[..]).expect_err("not an operation");
        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }
}
