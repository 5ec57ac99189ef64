"""The manual cannot drift from the code: docs/errors.md is generated from the code's own messages, every
flag of both scripts is in docs/flags.md (and it names no other), and README links every page of docs/.

    python tests/test_docs.py      # rewrite docs/errors.md after changing a message
"""
import ast
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ERRORS = os.path.join(ROOT, 'docs', 'errors.md')
RAISED = {'UserError': 'one line, exit status 2', 'JobError': 'one line from rank 0, exit status 2',
          'DamagedImage': 'an image file met during a run: one line, exit status 2, followed by what the run '
                          'keeps ("; training stopped and <the state> holds epoch N, the last complete one")',
          'ArgumentTypeError': 'a bad flag value: `argument --flag: <message> (see --help)`, exit status 2'}


def render(node):
    """The text of a message expression, its computed parts as {their code}."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return ''.join(render(part) if isinstance(part, ast.Constant) else
                       '{' + ast.unparse(part.value) + ('!r' if part.conversion == ord('r') else '') + '}'
                       for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left) + render(node.right)
    return '{' + ast.unparse(node) + '}'


def messages():
    """[(module, kind, message)] of every UserError, JobError and flag-type error the code makes, in order."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, '*.py'))):
        tree = ast.parse(open(path).read())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and
                 (getattr(n.func, 'id', None) or getattr(n.func, 'attr', None)) in RAISED]
        for call in sorted(calls, key=lambda n: n.lineno):
            kind = getattr(call.func, 'id', None) or call.func.attr
            text = render(call.args[0])
            if not re.fullmatch(r'\{[^{}]*\}', text):  # not one passed on from elsewhere
                found.append((os.path.basename(path), kind, text))
    return found


def generate():
    lines = ['# Error messages', '',
             'Every message a mistake of the user\'s can end a run with, generated from the code by '
             '`python tests/test_docs.py`', '(a test fails when this page and the code differ). A script prints '
             'it after `main.py: error: ` or', '`linear.py: error: ` on one line of stderr and exits with status 2, '
             'having written nothing. `{...}`', 'stands for a value the message is made of. What is on disk after '
             'each kind of failure: [resuming.md](resuming.md).', '']
    for kind, meaning in RAISED.items():
        lines.append(f'- {kind}: {meaning}')
    module = None
    for where, kind, text in messages():
        if where != module:
            module = where
            lines += ['', f'## `{module}`', '']
        text = text.replace('|', '\\|').replace('`', "'").strip()
        lines.append(f'- {kind}: `{text}`')
    return '\n'.join(lines) + '\n'


def test_the_error_list_is_the_codes():
    with open(ERRORS) as f:
        assert f.read() == generate(), 'docs/errors.md is out of date: run python tests/test_docs.py'


def test_messages_are_found():
    texts = [m[2] for m in messages()]
    assert any(t.startswith('--batch_size {batch_size} is larger than {what}') for t in texts)
    assert any('does not split evenly over' in t for t in texts)
    assert len(texts) > 40


def flags(parser):
    return {s for action in parser._actions for s in action.option_strings if s.startswith('--') and s != '--help'}


def test_every_flag_is_in_the_flag_page_and_no_other():
    import linear
    import main
    page = open(os.path.join(ROOT, 'docs', 'flags.md')).read()
    named = set(re.findall(r'`(--[a-z_0-9]+)', page))
    ours = flags(_parser(main)) | flags(_parser(linear))
    missing, unknown = ours - named, named - ours
    assert not missing, f'flags missing from docs/flags.md: {sorted(missing)}'
    assert not unknown, f'docs/flags.md names flags no script has: {sorted(unknown)}'


def _parser(script):
    """The script's ArgumentParser, caught as parse_args builds it."""
    import argparse
    seen = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        seen.append(self)
        return real(self, [] if args is None else args, namespace)
    argparse.ArgumentParser.parse_args = catch
    try:
        script.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen[0]


def test_readme_is_short_and_links_every_page():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert len(readme.splitlines()) <= 250
    for page in sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))):
        assert f'docs/{os.path.basename(page)}' in readme, f'README does not link docs/{os.path.basename(page)}'
    for link in re.findall(r'\]\((docs/[^)]+)\)', readme):
        assert os.path.exists(os.path.join(ROOT, link)), link


if __name__ == '__main__':
    with open(ERRORS, 'w') as f:
        f.write(generate())
    print(f'wrote {ERRORS} ({len(messages())} messages)')
