//! A lexer for PostgreSQL SQL text, precise about what is code and what is not.

/// One token of code. Strings, quoted identifiers and comments are skipped over but still mark
/// token boundaries; what the proxy needs from them is only that they are not code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// A keyword or unquoted identifier, as written (compare with `eq_ignore_ascii_case`).
    Word(&'a str),
    /// A `"quoted identifier"`, without its quotes (doubled quotes left as written).
    Quoted(&'a str),
    /// A string constant of any kind (`'..'`, `E'..'`, `$$..$$`), with its delimiters.
    Str(&'a str),
    /// A number.
    Number(&'a str),
    /// Any other character: punctuation and operators, one at a time.
    Symbol(u8),
}

impl Token<'_> {
    pub fn is_word(&self, w: &str) -> bool {
        matches!(self, Token::Word(x) if x.eq_ignore_ascii_case(w))
    }

    /// A word or quoted identifier as an identifier: unquoted ones fold to lower case.
    pub fn ident(&self) -> Option<String> {
        match self {
            Token::Word(w) => Some(w.to_ascii_lowercase()),
            Token::Quoted(q) => Some(q.replace("\"\"", "\"")),
            _ => None,
        }
    }
}

/// Tokens of `sql` with their byte offsets.
pub struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }

    pub fn offset(&self) -> usize {
        self.pos
    }

    fn skip_space_and_comments(&mut self) {
        let b = self.sql.as_bytes();
        loop {
            while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if b[self.pos..].starts_with(b"--") {
                while self.pos < b.len() && b[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if b[self.pos..].starts_with(b"/*") {
                // Block comments nest in PostgreSQL.
                let mut depth = 0usize;
                while self.pos < b.len() {
                    if b[self.pos..].starts_with(b"/*") {
                        depth += 1;
                        self.pos += 2;
                    } else if b[self.pos..].starts_with(b"*/") {
                        depth -= 1;
                        self.pos += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// Skips a quoted run starting at `self.pos` (the opening quote); `backslash` for `E''`.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        let b = self.sql.as_bytes();
        self.pos += 1;
        while self.pos < b.len() {
            let c = b[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if c == quote {
                if self.pos < b.len() && b[self.pos] == quote {
                    self.pos += 1; // doubled quote
                } else {
                    return;
                }
            }
        }
        self.pos = b.len();
    }

    /// A dollar-quote opening tag at `self.pos`, if there is one: `$$` or `$tag$`.
    fn dollar_tag(&self) -> Option<usize> {
        let b = self.sql.as_bytes();
        let mut i = self.pos + 1;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
            i += 1;
        }
        let first_is_digit = b.get(self.pos + 1).is_some_and(u8::is_ascii_digit);
        (i < b.len() && b[i] == b'$' && !first_is_digit).then_some(i + 1 - self.pos)
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_space_and_comments();
        let b = self.sql.as_bytes();
        let start = self.pos;
        let c = *b.get(start)?;
        let token = match c {
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Token::Str(&self.sql[start..self.pos])
            }
            b'e' | b'E' if b.get(start + 1) == Some(&b'\'') => {
                self.pos += 1;
                self.skip_quoted(b'\'', true);
                Token::Str(&self.sql[start..self.pos])
            }
            // B'..', X'..', N'..', U&'..' are ordinary quoting after a prefix.
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if b.get(start + 1) == Some(&b'\'') => {
                self.pos += 1;
                self.skip_quoted(b'\'', false);
                Token::Str(&self.sql[start..self.pos])
            }
            b'u' | b'U'
                if b.get(start + 1) == Some(&b'&')
                    && matches!(b.get(start + 2), Some(b'\'' | b'"')) =>
            {
                let q = b[start + 2];
                self.pos += 2;
                self.skip_quoted(q, false);
                if q == b'"' {
                    Token::Quoted(&self.sql[start + 3..self.pos - 1])
                } else {
                    Token::Str(&self.sql[start..self.pos])
                }
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                let end = if self.pos > start + 1 && b[self.pos - 1] == b'"' {
                    self.pos - 1
                } else {
                    self.pos
                };
                Token::Quoted(&self.sql[start + 1..end])
            }
            b'$' => match self.dollar_tag() {
                Some(len) => {
                    let tag = &self.sql[start..start + len];
                    match self.sql[start + len..].find(tag) {
                        Some(i) => self.pos = start + len + i + len,
                        None => self.pos = b.len(),
                    }
                    Token::Str(&self.sql[start..self.pos])
                }
                None => {
                    // A positional parameter ($1) or a lone $.
                    self.pos += 1;
                    while self.pos < b.len() && b[self.pos].is_ascii_digit() {
                        self.pos += 1;
                    }
                    Token::Symbol(b'$')
                }
            },
            c if is_ident_start(c) => {
                while self.pos < b.len() && is_ident_char(b[self.pos]) {
                    self.pos += 1;
                }
                Token::Word(&self.sql[start..self.pos])
            }
            c if c.is_ascii_digit() => {
                while self.pos < b.len()
                    && (b[self.pos].is_ascii_alphanumeric()
                        || b[self.pos] == b'.'
                        || b[self.pos] == b'_')
                {
                    self.pos += 1;
                }
                Token::Number(&self.sql[start..self.pos])
            }
            c => {
                self.pos += 1;
                // Keep multi-byte characters whole so offsets stay on char boundaries.
                while self.pos < b.len() && !self.sql.is_char_boundary(self.pos) {
                    self.pos += 1;
                }
                Token::Symbol(c)
            }
        };
        Some(token)
    }
}

/// The statements of a query string, each trimmed, empty ones left out. Splits at `;` outside
/// strings, comments and parentheses, and inside the body of `CREATE ... BEGIN ATOMIC ... END`.
pub fn split(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut lexer = Lexer::new(sql);
    let mut start = 0;
    let mut parens = 0i32;
    // In a CREATE statement: BEGIN/CASE ... END nesting, as psql tracks it.
    let mut first: Option<Token<'_>> = None;
    let mut block = 0i32;
    let mut prev: Option<Token<'_>> = None;
    while let Some(t) = lexer.next() {
        match t {
            Token::Symbol(b'(') => parens += 1,
            Token::Symbol(b')') => parens -= 1,
            Token::Symbol(b';') if parens <= 0 && block <= 0 => {
                push_trimmed(&mut out, &sql[start..lexer.offset() - 1]);
                start = lexer.offset();
                parens = 0;
                block = 0;
                first = None;
                prev = None;
                continue;
            }
            Token::Word(_) if first.is_some_and(|f| f.is_word("create")) => {
                let opens = t.is_word("atomic") && prev.is_some_and(|p| p.is_word("begin"));
                if opens || (t.is_word("case") && block > 0) {
                    block += 1;
                } else if t.is_word("end") && block > 0 {
                    block -= 1;
                }
            }
            _ => {}
        }
        if first.is_none() {
            first = Some(t);
        }
        prev = Some(t);
    }
    push_trimmed(&mut out, &sql[start..]);
    out
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    // A statement that is only comments is empty too.
    if Lexer::new(s).next().is_some() {
        out.push(s.trim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        Lexer::new(sql)
            .map(|t| match t {
                Token::Word(w) => w.to_string(),
                Token::Quoted(q) => format!("\"{q}\""),
                Token::Str(s) => format!("S({s})"),
                Token::Number(n) => format!("N({n})"),
                Token::Symbol(c) => (c as char).to_string(),
            })
            .collect()
    }

    #[test]
    fn tokens() {
        assert_eq!(words("SET x = 'a;b'"), ["SET", "x", "=", "S('a;b')"]);
        assert_eq!(
            words("select E'it\\'s;' , $$x;$$, $f$ $$ ; $f$"),
            [
                "select",
                "S(E'it\\'s;')",
                ",",
                "S($$x;$$)",
                ",",
                "S($f$ $$ ; $f$)"
            ]
        );
        assert_eq!(
            words("a/* x /* nested ; */ y; */b -- c;\nd"),
            ["a", "b", "d"]
        );
        assert_eq!(
            words("\"My \"\"Id\"\"\".col"),
            ["\"My \"\"Id\"\"\"", ".", "col"]
        );
        assert_eq!(words("$1 + 1.5e3"), ["$", "+", "N(1.5e3)"]);
        assert_eq!(words("'it''s' x"), ["S('it''s')", "x"]);
        assert_eq!(words("U&\"d\\0061t\" é"), ["\"d\\0061t\"", "é"]);
    }

    #[test]
    fn unterminated_input_never_panics() {
        for s in [
            "'abc", "E'ab\\", "\"abc", "$$abc", "$a$ x", "/* abc", "-- x", "U&'", "é'", "$",
        ] {
            let _ = words(s);
            let _ = split(s);
        }
    }

    #[test]
    fn splitting() {
        assert_eq!(
            split("SET a = 1; SELECT ';' ; ; -- only a comment\n"),
            ["SET a = 1", "SELECT ';'"]
        );
        assert_eq!(split("select 1"), ["select 1"]);
        assert_eq!(split("  ;  "), Vec::<&str>::new());
        assert_eq!(
            split("CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY a; NOTIFY b); SELECT 2"),
            [
                "CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY a; NOTIFY b)",
                "SELECT 2"
            ]
        );
        let atomic = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END";
        assert_eq!(
            split(&format!("{atomic}; SET x = 1")),
            [atomic, "SET x = 1"]
        );
        // BEGIN as a transaction start is not a block.
        assert_eq!(
            split("BEGIN; SET x = 1; END"),
            ["BEGIN", "SET x = 1", "END"]
        );
        assert_eq!(split("/* c */ SELECT 1; /* d */"), ["/* c */ SELECT 1"]);
    }
}
